"""Shift validation: the validation patients again, as another site or year would image them.

A validation split cut from the training pool shares the training images' scanner, exposure
and framing, so it overstates accuracy on new patients. Every validation image is re-imaged
here under one acquisition shift that radiographs really show (contrast and gamma,
brightness, blur, noise, lower resolution scaled back up, another crop or zoom, another
scanner's intensity range), each with its own severity. Kind and severity are drawn from a
fixed seed per image index, so the shifted set is the same in every run, epoch and round.
The severities are fixed here, once, and are not tuned to make any model look good.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from pneumonia.core.bounds import Seed
from pneumonia.data.imageset import ImageSet
from pneumonia.data.intensity import standardize
from pneumonia.data.transforms import gaussian_blur, reframe

KINDS = ("contrast", "gamma", "brightness", "blur", "noise", "lowres", "zoom", "scanner")


@dataclass
class ShiftConfig:
    """Shift validation (the `data.shift.*` config group)."""

    # Also score every validation patient re-imaged under an acquisition shift (val_shift/*
    # metrics, which `monitor` may pick by): pneumonia.data.shifts.
    enabled: bool = True
    seed: Seed = 20221  # fixed, independent of the run's seed: the same shifts in every run


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=g))


def _signed(g: torch.Generator, low: float, high: float) -> float:
    """A magnitude in [low, high] with a random sign."""
    sign = 1.0 if float(torch.rand((), generator=g)) < 0.5 else -1.0
    return sign * _uniform(g, low, high)


def apply_shift(x: torch.Tensor, kind: str, g: torch.Generator) -> torch.Tensor:
    """One shift of `kind` on one float image [1, 1, S, S] in [0, 1], severity drawn from `g`."""
    size = x.shape[-1]
    if kind == "contrast":
        mean = x.mean()
        return (x - mean) * (1 + _signed(g, 0.25, 0.45)) + mean
    if kind == "gamma":
        return x.clamp(min=0).pow(math.exp(_signed(g, 0.3, 0.5)))
    if kind == "brightness":
        return x + _signed(g, 0.08, 0.15)
    if kind == "blur":
        return gaussian_blur(x, torch.tensor([_uniform(g, 0.012, 0.025) * size]))
    if kind == "noise":
        sigma = _uniform(g, 0.03, 0.06)
        return x + sigma * torch.randn(x.shape, generator=g, dtype=x.dtype)
    if kind == "lowres":
        small = max(int(size * _uniform(g, 0.35, 0.5)), 4)
        down = F.interpolate(x, size=(small, small), mode="area")
        return F.interpolate(down, size=(size, size), mode="bilinear", align_corners=False)
    if kind == "zoom":
        scale = _uniform(g, 1.12, 1.3) if float(torch.rand((), generator=g)) < 0.6 else 0.85
        return reframe(x, scale, _signed(g, 0.0, 0.08), _signed(g, 0.0, 0.08))
    if kind == "scanner":
        # Another detector's window: a compressed, offset intensity range, coarser levels.
        low, high = _uniform(g, 0.05, 0.15), _uniform(g, 0.78, 0.9)
        levels = 2 ** int(_uniform(g, 5, 7))
        return torch.round((low + x * (high - low)) * levels) / levels
    raise ValueError(f"unknown shift {kind!r}: one of {', '.join(KINDS)}")


def shift_kinds(n: int, seed: int) -> list[str]:
    """The shift each of n images gets: every kind equally often, in a seeded order."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g).tolist()
    kinds = [""] * n
    for rank, i in enumerate(order):
        kinds[i] = KINDS[rank % len(KINDS)]
    return kinds


def shift_images(images: torch.Tensor, kinds: list[str], seed: int) -> torch.Tensor:
    """uint8 [N, 1, S, S] -> the same images, each under its kind, as uint8."""
    out = torch.empty_like(images)
    for i, kind in enumerate(kinds):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)  # per image: order-free
        x = images[i : i + 1].float() / 255.0
        y = apply_shift(x, kind, g).clamp(0.0, 1.0)
        out[i : i + 1] = torch.round(y * 255.0).to(torch.uint8)
    return out


def shifted(imageset: ImageSet, cfg: ShiftConfig, intensity: str = "none") -> ImageSet:
    """`imageset` re-imaged, each image under its seeded kind, then standardised by
    `intensity` (data.intensity: give the images before standardisation, so that it sees what
    the other scanner produced). Names get the kind as a suffix ("name#kind") so predictions
    can be grouped by shift."""
    kinds = shift_kinds(len(imageset), cfg.seed)
    images = standardize(shift_images(imageset.images, kinds, cfg.seed), intensity)
    names = [f"{n}#{k}" for n, k in zip(imageset.names, kinds, strict=True)]
    return replace(imageset, images=images, names=names)
