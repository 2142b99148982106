"""Augmentation on whole batches of tensors (on the GPU when there is one), not per image."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pneumonia.bounds import (
    ClosedUnitInterval,
    Degrees,
    FractionBelowOne,
    FractionUpToOne,
    NonNegativeFloat,
    PositiveFloat,
)
from pneumonia.errors import UserError


@dataclass
class AugmentConfig:
    """Random affine, crop and intensity changes per image (the `data.augment.*` group).
    Every intensity option is off at 0."""

    enabled: bool = True
    rotation: Degrees = 10.0  # degrees, uniform in [-rotation, rotation]
    translate: FractionBelowOne = 0.08  # fraction of the image side, per axis
    scale_min: PositiveFloat = 0.9
    scale_max: PositiveFloat = 1.1
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


def check_augment(cfg: AugmentConfig) -> None:
    """What the parser's ranges (pneumonia.bounds) cannot say: one field against another."""
    if cfg.scale_min > cfg.scale_max:
        raise UserError(
            f"data.augment.scale_min {cfg.scale_min} is above data.augment.scale_max "
            f"{cfg.scale_max}: the scale is drawn from [scale_min, scale_max]"
        )


def augment_batch(images: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """The training augmentation of a float batch [B, C, H, W] in [0, 1]: affine and crop in
    one resampling, then the intensity changes; seeded by torch's global RNG."""
    images = random_affine(images, cfg)
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
