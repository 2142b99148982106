"""Augmentation on whole batches of tensors (on the GPU when there is one), not per image."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pneumonia.core.bounds import (
    ClosedUnitInterval,
    Degrees,
    FractionBelowOne,
    FractionUpToOne,
    KernelSide,
    NonNegativeFloat,
    PositiveFloat,
)
from pneumonia.core.errors import UserError


@dataclass
class AugmentConfig:
    """Random affine, crop and intensity changes per image (the `data.augment.*` group).
    Every intensity option is off at 0."""

    enabled: bool = True  # false: no augmentation at all (leave the options below unset)
    rotation: Degrees = 10.0  # degrees, uniform in [-rotation, rotation]
    translate: FractionBelowOne = 0.08  # fraction of the image side, per axis
    scale_min: PositiveFloat = 0.9  # zoom factor, uniform in [scale_min, scale_max]
    scale_max: PositiveFloat = 1.1  # see scale_min
    hflip: bool = False  # off by default: the heart sits on one side of a radiograph
    # Random-resized-crop zoom: a crop of area in [crop_area_min, 1] of the image and aspect
    # ratio in [3/4, 4/3], resized back to the full side. 1.0: off.
    crop_area_min: FractionUpToOne = 1.0
    brightness: NonNegativeFloat = 0.0  # add uniform [-b, b]
    contrast: FractionBelowOne = 0.0  # scale around the image mean by uniform [1 - c, 1 + c]
    gamma: NonNegativeFloat = 0.0  # x ** exp(uniform [-g, g])
    noise: NonNegativeFloat = 0.0  # gaussian noise of standard deviation uniform [0, n]
    blur: NonNegativeFloat = 0.0  # gaussian blur of sigma uniform [0, blur] x the image side
    intensity_p: ClosedUnitInterval = (
        0.8  # probability that an image gets the intensity changes at all
    )
    # RandConv (Xu et al., ICLR 2021): the probability that an image is mixed with itself
    # through a random convolution (odd kernel sides 1..randconv_max_kernel): new textures and
    # contrasts from the same anatomy, so no extra data. 0: off.
    randconv: ClosedUnitInterval = 0.0
    randconv_max_kernel: KernelSide = 7  # the paper's sides {1, 3, 5, 7}


def check_augment(cfg: AugmentConfig) -> None:
    """What the parser's ranges (pneumonia.core.bounds) cannot say: one field against another."""
    if cfg.scale_min > cfg.scale_max:
        raise UserError(
            f"data.augment.scale_min {cfg.scale_min} is above data.augment.scale_max "
            f"{cfg.scale_max}: the scale is drawn from [scale_min, scale_max]"
        )
    if not cfg.enabled and (on := _options_on(cfg)):
        raise UserError(
            f"data.augment.{on[0]} is set but data.augment.enabled is false, so it would not "
            f"be applied: set data.augment.enabled true, or drop data.augment.{on[0]}"
        )
    if cfg.randconv_max_kernel % 2 == 0:
        raise UserError(
            f"data.augment.randconv_max_kernel {cfg.randconv_max_kernel} must be odd (a kernel "
            "centred on its pixel): use 1, 3, 5, 7, ..."
        )


def _options_on(cfg: AugmentConfig) -> list[str]:
    """The options that are off at their defaults and set here (the affine's defaults are on,
    so its fields cannot tell whether someone set them)."""
    zero_off = ("brightness", "contrast", "gamma", "noise", "blur", "randconv")
    on = [name for name in zero_off if getattr(cfg, name) > 0]
    return (
        on + (["hflip"] if cfg.hflip else []) + (["crop_area_min"] if cfg.crop_area_min < 1 else [])
    )


def augment_batch(images: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """The training augmentation of a float batch [B, C, H, W] in [0, 1]: affine and crop in
    one resampling, then random convolutions, then the intensity changes; seeded by torch's
    global RNG."""
    images = random_affine(images, cfg)
    if cfg.randconv > 0:  # off: no draw, so the other augmentations see the RNG they did
        images = random_convolution(images, cfg.randconv, cfg.randconv_max_kernel)
    if _intensity_on(cfg):
        images = random_intensity(images, cfg)
    return images


def _intensity_on(cfg: AugmentConfig) -> bool:
    return any(v > 0 for v in (cfg.brightness, cfg.contrast, cfg.gamma, cfg.noise, cfg.blur))


def _spread(b: int, amount: float, device, dtype) -> torch.Tensor:
    """Per image, uniform in [-amount, amount], shaped to broadcast over [B, C, H, W]."""
    return ((torch.rand(b, device=device, dtype=dtype) * 2 - 1) * amount).view(b, 1, 1, 1)


def random_intensity(images: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """Brightness, contrast, gamma, blur and noise, each image by its own amount; the result
    stays in [0, 1] and keeps dtype and shape."""
    b, device, dtype = images.shape[0], images.device, images.dtype
    x = images
    if cfg.gamma > 0:
        x = x.clamp(min=0).pow(torch.exp(_spread(b, cfg.gamma, device, dtype)))
    if cfg.contrast > 0:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * (1 + _spread(b, cfg.contrast, device, dtype)) + mean
    if cfg.brightness > 0:
        x = x + _spread(b, cfg.brightness, device, dtype)
    if cfg.blur > 0:
        x = _random_blur(x, cfg.blur)
    if cfg.noise > 0:
        sigma = torch.rand(b, device=device, dtype=dtype).view(b, 1, 1, 1) * cfg.noise
        x = x + sigma * torch.randn_like(x)
    keep = torch.rand(b, device=device).view(b, 1, 1, 1) >= cfg.intensity_p
    return torch.where(keep, images, x).clamp(0.0, 1.0)


def _random_blur(x: torch.Tensor, blur: float) -> torch.Tensor:
    """Gaussian blur with a per-image sigma in [0, blur * side] pixels."""
    b, w = x.shape[0], x.shape[-1]
    sigma = (torch.rand(b, device=x.device, dtype=x.dtype) * blur * w).clamp(min=1e-3)
    # The kernel's reach from the largest sigma allowed, not drawn: one size for every batch.
    return gaussian_blur(x, sigma, radius=int(math.ceil(3 * blur * w)))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int | None = None) -> torch.Tensor:
    """Separable gaussian blur of a batch [B, C, H, W], image b with sigma[b] pixels, as one
    grouped convolution (replicated borders); the kernel reaches 3 sigma unless `radius`."""
    b, c, h, w = x.shape
    radius = max(radius or int(math.ceil(3 * float(sigma.max()))), 1)
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-(t.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [B*C, K]
    flat = F.pad(x.reshape(1, b * c, h, w), (radius,) * 4, mode="replicate")
    flat = F.conv2d(flat, kernel.view(b * c, 1, 1, -1), groups=b * c)
    flat = F.conv2d(flat, kernel.view(b * c, 1, -1, 1), groups=b * c)
    return flat.view(b, c, h, w)


def random_convolution(images: torch.Tensor, p: float, max_kernel: int = 7) -> torch.Tensor:
    """RandConv's "mix" variant (Xu et al., ICLR 2021) on a float batch [B, C, H, W] in [0, 1]:
    with probability `p` an image becomes a x + (1 - a) conv(x), a ~ U(0, 1), through its own
    random C -> C kernel of odd side k drawn from 1..max_kernel, weights N(0, 1 / (k k C)).
    Shape, dtype and range [0, 1] are kept; seeded by torch's global RNG."""
    if p <= 0:
        return images
    b, c, device, dtype = images.shape[0], images.shape[1], images.device, images.dtype
    sides = 1 + 2 * torch.randint(0, max_kernel // 2 + 1, (b,), device=device)
    std = 1 / (sides.to(dtype) * math.sqrt(c))  # 1 / sqrt(fan-in k k C)
    weights = torch.randn(b, c, c, max_kernel, max_kernel, device=device, dtype=dtype)
    # Each image's k x k kernel sits at the centre of the shared max_kernel square, zero
    # outside it: one convolution for all sides. Reflect padding reads the same pixels
    # whatever its width, so a padded k-kernel convolves exactly as a k x k one would.
    reach = (torch.arange(max_kernel, device=device) - max_kernel // 2).abs()
    inside = (reach.view(1, -1) <= sides.view(-1, 1) // 2).to(dtype)  # [B, K]
    mask = inside.view(b, 1, 1, -1, 1) * inside.view(b, 1, 1, 1, -1)
    weights = weights * mask * std.view(b, 1, 1, 1, 1)
    mix = torch.rand(b, device=device, dtype=dtype)
    mixed = convolve_mix(images, weights, mix)
    keep = torch.rand(b, device=device).view(b, 1, 1, 1) >= p
    return torch.where(keep, images, mixed)


def convolve_mix(images: torch.Tensor, weights: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """mix[b] x[b] + (1 - mix[b]) conv(x[b], weights[b]) for a batch [B, C, H, W] in [0, 1] and
    per-image kernels [B, C, C, K, K] (K odd), as one grouped convolution with reflected
    borders; each conv(x[b]) is min-max scaled to [0, 1] first (its range is arbitrary), and a
    constant one (nothing to scale) is replaced by x[b] itself."""
    b, c, h, w = images.shape
    k = weights.shape[-1]
    flat = F.pad(images.reshape(1, b * c, h, w), (k // 2,) * 4, mode="reflect")
    out = F.conv2d(flat, weights.reshape(b * c, c, k, k), groups=b).view(b, c, h, w)
    low = out.amin(dim=(1, 2, 3), keepdim=True)
    span = out.amax(dim=(1, 2, 3), keepdim=True) - low
    constant = span <= 1e-6
    out = torch.where(constant, images, (out - low) / span.clamp(min=1e-6))
    mix = mix.view(b, 1, 1, 1)
    return (mix * images + (1 - mix) * out).clamp(0.0, 1.0)


def reframe(
    images: torch.Tensor, scale: float, dx: float, dy: float, padding: str = "zeros"
) -> torch.Tensor:
    """The whole batch zoomed by `scale` (> 1 zooms in) and moved by (dx, dy) in grid units
    (the image spans [-1, 1])."""
    theta = torch.tensor([[1 / scale, 0.0, dx], [0.0, 1 / scale, dy]], dtype=images.dtype)
    theta = theta.to(images.device).expand(len(images), 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def random_affine(images: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """Rotate, translate, scale (and optionally flip) each image of a float batch [B, C, H, W]
    by its own random amount, in one grid_sample call."""
    b, device = images.shape[0], images.device
    angle = (torch.rand(b, device=device) * 2 - 1) * math.radians(cfg.rotation)
    scale = cfg.scale_min + torch.rand(b, device=device) * (cfg.scale_max - cfg.scale_min)
    shift = (torch.rand(b, 2, device=device) * 2 - 1) * cfg.translate * 2  # grid spans [-1, 1]
    flip = torch.ones(b, device=device)
    if cfg.hflip:
        flip = torch.where(torch.rand(b, device=device) < 0.5, -1.0, 1.0)
    # The crop's side lengths as fractions of the image (1, 1 when crop_area_min is 1), and
    # a centre that keeps it inside the image.
    crop_w, crop_h = torch.ones(b, device=device), torch.ones(b, device=device)
    if cfg.crop_area_min < 1.0:
        area = cfg.crop_area_min + torch.rand(b, device=device) * (1 - cfg.crop_area_min)
        log_ratio = (torch.rand(b, device=device) * 2 - 1) * math.log(4 / 3)
        crop_w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
        crop_h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
        shift = shift + (torch.rand(b, 2, device=device) * 2 - 1) * torch.stack(
            [1 - crop_w, 1 - crop_h], 1
        )
    # affine_grid maps output to input coordinates, so the inverse scale zooms in for scale > 1.
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos * flip * crop_w, -sin * crop_h, shift[:, 0]], 1),
            torch.stack([sin * flip * crop_w, cos * crop_h, shift[:, 1]], 1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# Test-time augmentation: the image itself and four small, fixed re-framings (zoom in 6%;
# shift by 4% of the side left, right and down), as (scale, dx, dy) in grid units.
TTA_FRAMES = (
    (1.0, 0.0, 0.0),
    (1.06, 0.0, 0.0),
    (1.0, 0.08, 0.0),
    (1.0, -0.08, 0.0),
    (1.0, 0.0, 0.08),
)


def tta_views(images: torch.Tensor) -> list[torch.Tensor]:
    """The TTA_FRAMES views of a float batch [B, C, H, W] in [0, 1]."""
    return [reframe(images, *frame, padding="border") for frame in TTA_FRAMES]
