"""Figures without pyplot: they belong to no window and no backend, so drawing one neither
needs a screen nor changes matplotlib's process-wide state (the commands choose the Agg
backend at start-up, `core.startup`; a notebook keeps its own)."""

from __future__ import annotations

from typing import Any

from matplotlib.figure import Figure


def subplots(*grid: int, figsize: tuple[float, float], **options: Any) -> tuple[Figure, Any]:
    """`pyplot.subplots(*grid, figsize=..., **options)`'s (figure, axes), on a bare Figure:
    saved with `figure.savefig`, freed with the last reference (no `pyplot.close`)."""
    figure = Figure(figsize=figsize)
    return figure, figure.subplots(*grid, **options)
