"""RandConv (pneumonia.data.transforms.random_convolution): shape, dtype and range kept, seeded,
off at 0, one grouped convolution equal to per-image ones, and hand-computed values."""

import pytest
import torch
import torch.nn.functional as F

from pneumonia import fit
from pneumonia.core.errors import UserError
from pneumonia.data.transforms import (
    AugmentConfig,
    augment_batch,
    check_augment,
    convolve_mix,
    random_affine,
    random_convolution,
    random_intensity,
)


def batch(seed: int = 0, b: int = 6, c: int = 1, side: int = 16, dtype=torch.float32):
    return torch.rand(b, c, side, side, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels", [1, 3])
def test_shape_dtype_and_range_are_kept(dtype, channels):
    torch.manual_seed(0)
    images = batch(c=channels, dtype=dtype)
    out = random_convolution(images, 1.0, 7)
    assert out.shape == images.shape and out.dtype == dtype
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert not torch.allclose(out, images)


def test_same_seed_same_output_other_seed_other_output():
    images = batch()
    outs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        outs.append(random_convolution(images, 1.0, 7))
    assert torch.equal(outs[0], outs[1])
    assert not torch.allclose(outs[0], outs[2])


def test_off_returns_the_input_and_draws_nothing():
    images = batch()
    torch.manual_seed(0)
    assert random_convolution(images, 0.0, 7) is images
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(1))


def test_probability_chooses_which_images_change():
    torch.manual_seed(0)
    images = batch(b=400, side=8)
    out = random_convolution(images, 0.3, 5)
    changed = (out - images).abs().amax(dim=(1, 2, 3)) > 0
    assert 0.2 < changed.float().mean() < 0.4
    assert torch.equal(out[~changed], images[~changed])


@pytest.mark.parametrize("w", [2.5, -0.7])
def test_kernel_size_one_is_a_hand_computed_affine(w):
    images = batch(b=3, side=9)
    weights = torch.full((3, 1, 1, 1, 1), w)
    mix = torch.tensor([0.0, 0.25, 0.9])
    out = convolve_mix(images, weights, mix)
    low = images.amin(dim=(1, 2, 3), keepdim=True)
    high = images.amax(dim=(1, 2, 3), keepdim=True)
    # w x rescaled to [0, 1]: (x - min) / (max - min) for w > 0, (max - x) / (max - min) below
    scaled = (images - low) / (high - low) if w > 0 else (high - images) / (high - low)
    a = mix.view(3, 1, 1, 1)
    torch.testing.assert_close(out, a * images + (1 - a) * scaled)


def test_one_grouped_convolution_equals_each_image_on_its_own():
    gen = torch.Generator().manual_seed(1)
    images = batch(b=4, c=3, side=12)
    weights = torch.randn(4, 3, 3, 5, 5, generator=gen)
    mix = torch.rand(4, generator=gen)
    out = convolve_mix(images, weights, mix)
    for i in range(4):
        conv = F.conv2d(F.pad(images[i : i + 1], (2,) * 4, mode="reflect"), weights[i])
        scaled = (conv - conv.min()) / (conv.max() - conv.min())
        want = (mix[i] * images[i : i + 1] + (1 - mix[i]) * scaled).clamp(0, 1)
        torch.testing.assert_close(out[i : i + 1], want)


def test_a_small_kernel_centred_in_zeros_convolves_as_itself():
    """The reason one max-size convolution serves every kernel side: reflect padding reads
    the same pixels whatever its width."""
    images = batch(b=2, side=10)
    small = torch.randn(2, 1, 1, 3, 3, generator=torch.Generator().manual_seed(2))
    big = F.pad(small, (2, 2, 2, 2))  # 7 x 7, zero outside the centre 3 x 3
    mix = torch.tensor([0.3, 0.6])
    torch.testing.assert_close(convolve_mix(images, big, mix), convolve_mix(images, small, mix))


def test_a_constant_image_stays_what_it_was():
    images = torch.full((2, 1, 8, 8), 0.4)
    torch.manual_seed(0)
    out = random_convolution(images, 1.0, 7)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, images)


def test_kernel_weights_scale_with_the_fan_in(monkeypatch):
    """Every kernel's weights have standard deviation 1 / sqrt(k k C): at k = 1 and C = 1,
    a unit normal draw, so the kernel is the draw itself."""
    seen = {}
    real = convolve_mix

    def spy(images, weights, mix):
        seen["weights"] = weights
        return real(images, weights, mix)

    monkeypatch.setattr("pneumonia.data.transforms.convolve_mix", spy)
    torch.manual_seed(5)
    random_convolution(batch(b=2000, side=4), 1.0, 1)
    assert seen["weights"].shape == (2000, 1, 1, 1, 1)
    assert abs(seen["weights"].std().item() - 1.0) < 0.05
    torch.manual_seed(5)
    random_convolution(batch(b=2000, side=8), 1.0, 7)
    weights = seen["weights"]
    sides = (weights != 0).flatten(1).sum(1).sqrt().round()
    assert set(sides.tolist()) == {1.0, 3.0, 5.0, 7.0}
    for k in (3, 7):
        picked = weights[sides == k]
        centre = picked[..., 3 - k // 2 : 4 + k // 2, 3 - k // 2 : 4 + k // 2]
        assert abs(centre.std().item() * k - 1.0) < 0.1


def test_augment_batch_with_defaults_is_what_it_was():
    images = batch(b=8)
    for cfg in (AugmentConfig(), AugmentConfig(brightness=0.2, noise=0.05)):
        torch.manual_seed(7)
        got = augment_batch(images, cfg)
        torch.manual_seed(7)
        want = random_affine(images, cfg)
        if cfg.brightness:
            want = random_intensity(want, cfg)
        assert torch.equal(got, want)


def test_augment_batch_runs_randconv_after_the_affine_before_the_intensity():
    images = batch(b=8)
    cfg = AugmentConfig(randconv=0.5, randconv_max_kernel=5, brightness=0.2)
    torch.manual_seed(7)
    got = augment_batch(images, cfg)
    torch.manual_seed(7)
    want = random_intensity(random_convolution(random_affine(images, cfg), 0.5, 5), cfg)
    assert torch.equal(got, want)
    torch.manual_seed(7)
    assert not torch.equal(got, augment_batch(images, AugmentConfig(brightness=0.2)))


def test_an_even_kernel_side_is_refused_in_one_line():
    with pytest.raises(UserError, match="randconv_max_kernel 4 must be odd"):
        check_augment(AugmentConfig(randconv=0.5, randconv_max_kernel=4))
    check_augment(AugmentConfig(randconv=0.5, randconv_max_kernel=5))


def test_the_fit_parser_refuses_an_even_kernel_before_any_run(tmp_path, capsys):
    runs = tmp_path / "runs"
    argv = ["--data.image_size", "32", "--model.width", "16", "--runs_root", str(runs)]
    with pytest.raises(SystemExit) as exit_info:
        fit.main([*argv, "--data.augment.randconv_max_kernel", "6"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.augment.randconv_max_kernel 6 must be odd" in err[0]
    assert not runs.exists()
