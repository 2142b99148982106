import pytest
import torch

from pneumonia.data.transforms import AugmentConfig, random_affine

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
