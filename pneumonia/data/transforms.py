"""Augmentation on whole batches of tensors (on the GPU when there is one), not per image."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    """Random affine per image (the `data.augment.*` config group)."""

    enabled: bool = True
    rotation: float = 10.0  # degrees, uniform in [-rotation, rotation]
    translate: float = 0.08  # fraction of the image side, per axis
    scale_min: float = 0.9
    scale_max: float = 1.1
    hflip: bool = False  # off by default: the heart sits on one side of a radiograph


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
    # affine_grid maps output to input coordinates, so the inverse scale zooms in for scale > 1.
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos * flip, -sin, shift[:, 0]], 1),
            torch.stack([sin * flip, cos, shift[:, 1]], 1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
