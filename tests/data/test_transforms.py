import pytest
import torch

from pneumonia.core.errors import UserError
from pneumonia.data.transforms import AugmentConfig, check_augment, random_affine

IDENTITY = dict(rotation=0.0, translate=0.0, scale_min=1.0, scale_max=1.0)


def fixed_rand(value: float):
    """A stand-in for torch.rand that always returns `value`."""
    real_full = torch.full

    def rand(*size, device=None, **kwargs):
        return real_full(size, value, device=device)

    return rand


def test_identity_config_returns_input():
    torch.manual_seed(0)
    images = torch.rand(5, 1, 17, 17)
    out = random_affine(images, AugmentConfig(**IDENTITY, hflip=False))
    assert torch.allclose(out, images, atol=1e-5)


def test_forced_flip_mirrors_left_and_right(monkeypatch):
    images = torch.rand(3, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(torch, "rand", fixed_rand(0.0))  # every draw < 0.5: every image flips
    out = random_affine(images, AugmentConfig(**IDENTITY, hflip=True))
    assert torch.allclose(out, images.flip(-1), atol=1e-5)


def test_flip_hits_about_half_the_images():
    torch.manual_seed(0)
    images = torch.zeros(400, 1, 8, 8)
    images[..., :4] = 1.0  # left-heavy
    out = random_affine(images, AugmentConfig(**IDENTITY, hflip=True))
    right_heavy = out[..., 4:].sum(dim=(1, 2, 3)) > out[..., :4].sum(dim=(1, 2, 3))
    assert 0.4 < right_heavy.float().mean() < 0.6
    # the others are untouched
    assert torch.allclose(out[~right_heavy], images[~right_heavy], atol=1e-5)


def test_no_flip_when_hflip_is_off(monkeypatch):
    monkeypatch.setattr(torch, "rand", fixed_rand(0.0))
    images = torch.rand(2, 1, 9, 9, generator=torch.Generator().manual_seed(1))
    out = random_affine(images, AugmentConfig(**IDENTITY, hflip=False))
    assert torch.allclose(out, images, atol=1e-5)


def test_largest_rotation_turns_by_that_angle(monkeypatch):
    monkeypatch.setattr(torch, "rand", fixed_rand(1.0))  # angle = +rotation
    images = torch.rand(2, 1, 10, 10, generator=torch.Generator().manual_seed(2))
    cfg = AugmentConfig(rotation=90.0, translate=0.0, scale_min=1.0, scale_max=1.0)
    out = random_affine(images, cfg)
    quarter_turns = [torch.rot90(images, k, dims=(-2, -1)) for k in (1, -1)]
    assert any(torch.allclose(out, turned, atol=1e-4) for turned in quarter_turns)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_and_dtype_are_preserved(dtype):
    images = torch.rand(3, 1, 20, 20, dtype=dtype)
    out = random_affine(images, AugmentConfig(hflip=True))
    assert out.shape == images.shape and out.dtype == dtype


def test_each_image_gets_its_own_transform():
    torch.manual_seed(0)
    image = torch.rand(1, 1, 24, 24)
    out = random_affine(image.repeat(2, 1, 1, 1), AugmentConfig(rotation=10.0))
    assert not torch.allclose(out[0], image[0], atol=1e-3)
    assert (out[0] - out[1]).abs().max() > 0.05


INTENSITY = dict(brightness=0.2, contrast=0.3, gamma=0.3, noise=0.05, blur=0.03)


@pytest.mark.parametrize("option", [*INTENSITY, "crop_area_min"])
def test_each_new_augmentation_keeps_dtype_range_and_shape_and_is_seeded(option):
    from pneumonia.data.transforms import augment_batch

    value = 0.5 if option == "crop_area_min" else INTENSITY[option]
    cfg = AugmentConfig(**IDENTITY, **{option: value}, intensity_p=1.0)
    images = torch.rand(6, 1, 20, 20, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(11)
    a = augment_batch(images, cfg)
    torch.manual_seed(11)
    b = augment_batch(images, cfg)
    assert a.dtype == images.dtype and a.shape == images.shape
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.equal(a, b)  # the global seed fixes it
    assert (a - images).abs().mean() > 1e-3  # and it does something


def test_intensity_options_at_zero_leave_images_alone():
    from pneumonia.data.transforms import augment_batch

    images = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    out = augment_batch(images, AugmentConfig(**IDENTITY, intensity_p=1.0))
    assert torch.allclose(out, images, atol=1e-5)


def test_intensity_probability_zero_keeps_every_image():
    from pneumonia.data.transforms import random_intensity

    images = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    out = random_intensity(images, AugmentConfig(**IDENTITY, **INTENSITY, intensity_p=0.0))
    assert torch.equal(out, images)


def test_brightness_adds_one_offset_per_image(monkeypatch):
    from pneumonia.data.transforms import random_intensity

    images = torch.full((2, 1, 4, 4), 0.5)
    monkeypatch.setattr(torch, "rand", fixed_rand(0.75))  # offset (2 x 0.75 - 1) x 0.2
    out = random_intensity(images, AugmentConfig(**IDENTITY, brightness=0.2, intensity_p=1.0))
    assert torch.allclose(out, torch.full_like(images, 0.6))


def test_crops_zoom_in():
    # A crop of a quarter to all of the image, resized to the full side, magnifies: a 5 x 5
    # bright square comes out at least as large, and larger on average (area 1/a).
    images = torch.zeros(1, 1, 21, 21)
    images[..., 8:13, 8:13] = 1.0
    torch.manual_seed(0)
    cfg = AugmentConfig(**IDENTITY, crop_area_min=0.25)
    bright = [float((random_affine(images, cfg) > 0.5).sum()) for _ in range(40)]
    assert sum(bright) / len(bright) > 1.5 * 25
    assert max(bright) > 2 * 25


def test_tta_views_start_with_the_image_itself():
    from pneumonia.data.transforms import TTA_FRAMES, tta_views

    images = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    views = tta_views(images)
    assert len(views) == len(TTA_FRAMES)
    assert torch.allclose(views[0], images, atol=1e-5)
    assert not torch.allclose(views[1], images, atol=1e-3)


@pytest.mark.parametrize(
    "option", [{"noise": 0.1}, {"randconv": 0.5}, {"hflip": True}, {"crop_area_min": 0.5}]
)
def test_an_option_under_disabled_augmentation_is_refused(option):
    with pytest.raises(UserError, match=f"data.augment.{next(iter(option))} is set but"):
        check_augment(AugmentConfig(enabled=False, **option))
    check_augment(AugmentConfig(enabled=True, **option))  # on: accepted
    check_augment(AugmentConfig(enabled=False))  # nothing set: accepted
