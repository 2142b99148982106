"""Progressive resizing: train at a low resolution early and at the final one at the end.

The images are decoded (and cached) once at the final size, `data.image_size`; a training batch
is shrunk on the device before augmentation while the schedule says so. Validation, the
checkpoint and everything that uses the model see the final size only. The schedule is FFCV's
ResNet recipe's (Leclerc et al., CVPR 2023): a linear ramp of the side from `start_size` to the
final size, rounded to a multiple of 16 pixels, reaching the final size when
`final_fraction` of the epochs are left. A ResNet pools globally, so one set of weights takes
any side; low resolution costs about (side / final)^2 of a final-size step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pneumonia.core.bounds import FractionUpToOne, NonNegativeInt
from pneumonia.core.errors import UserError

STEP = 16  # sides move in steps of 16 px: fewer distinct shapes, each worth its warm-up


@dataclass
class ProgressiveConfig:
    """The `data.progressive.*` group: off while start_size is 0."""

    start_size: NonNegativeInt = 0  # the side of the first epoch's batches; 0: off
    # The last fraction of the epochs (a federation's: rounds x local epochs) at the final
    # side: the model settles at the resolution it will be used at.
    final_fraction: FractionUpToOne = 0.25


def check_progressive(cfg: ProgressiveConfig, image_size: int) -> None:
    """A start side no smaller than the final one or below 16 px, and a final fraction that
    would switch the ramp off or that nothing reads."""
    if not cfg.start_size:
        if cfg.final_fraction != ProgressiveConfig.final_fraction:
            raise UserError(
                f"data.progressive.final_fraction {cfg.final_fraction} is set but "
                f"data.progressive.start_size is 0 (off): set a start size, or drop it"
            )
        return
    if not STEP <= cfg.start_size < image_size:
        raise UserError(
            f"data.progressive.start_size {cfg.start_size} must lie in [{STEP}, "
            f"data.image_size {image_size}) or be 0 (off)"
        )
    if cfg.final_fraction >= 1.0:
        raise UserError(
            "data.progressive.final_fraction 1 leaves no epoch to ramp over: use a fraction "
            "below 1, or data.progressive.start_size 0 to switch progressive resizing off"
        )


def size_at(epoch: int, total: int, cfg: ProgressiveConfig, final: int) -> int:
    """The training side at 0-based `epoch` of `total`: `final` when off, else the ramp."""
    if not cfg.start_size:
        return final
    # The first epoch at the final side: at least the last one, however short the run.
    ramp_end = min(math.ceil((1.0 - cfg.final_fraction) * total), max(total - 1, 0))
    if epoch >= ramp_end:
        return final
    side = cfg.start_size + (final - cfg.start_size) * epoch / ramp_end
    return max(cfg.start_size, min(final, int(side // STEP) * STEP))


def resize_batch(images: torch.Tensor, side: int) -> torch.Tensor:
    """A batch [B, C, S, S] (uint8 or float in [0, 1]) as floats in [0, 1] at side x side,
    antialiased as the decoder's own resize is."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images
    if x.shape[-1] == side:
        return x
    out = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return out.clamp(0.0, 1.0)
