"""Per-image intensity standardisation (`data.intensity`): each image's grey levels spread by
its own histogram, so that inputs vary less with the scanner and exposure that made them.

none: the image as decoded. equalize: global histogram equalisation (scikit-image's
`exposure.equalize_hist`: each grey level becomes the share of the image's pixels at or below
it). clahe: contrast-limited adaptive histogram equalisation (`exposure.equalize_adapthist`,
tiles of 1/8 of the side, clip limit 0.01). Applied by `pneumonia.data.decode.prepare` after
the image is squashed to the model's size, and after any simulated re-imaging (shift
validation, site profiles): a standardisation sees what the scanner produced.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
import torch
from skimage import exposure

Intensity = Literal["none", "equalize", "clahe"]  # data.intensity's type: the parser checks it
INTENSITIES: tuple[str, ...] = get_args(Intensity)
CLAHE_CLIP = 0.01  # scikit-image's default


def standardize(images: torch.Tensor, mode: str) -> torch.Tensor:
    """uint8 [1, H, W] or [N, 1, H, W] -> the same shape and dtype, each image standardised
    by `mode` (none returns `images` itself). An image of one grey level has no histogram to
    spread and is returned as it is."""
    if mode == "none":
        return images
    if mode not in INTENSITIES:
        raise ValueError(f"unknown intensity {mode!r}: one of {', '.join(INTENSITIES)}")
    if images.dtype != torch.uint8 or images.ndim not in (3, 4) or images.shape[-3] != 1:
        shape = list(images.shape)
        raise ValueError(f"expected uint8 [1, H, W] or [N, 1, H, W], got {images.dtype} {shape}")
    flat = images.reshape(-1, *images.shape[-2:]).numpy()
    out = np.empty_like(flat)
    for i, image in enumerate(flat):
        out[i] = _one(image, mode)
    return torch.from_numpy(out).reshape(images.shape)


def _one(image: np.ndarray, mode: str) -> np.ndarray:
    """One uint8 [H, W] image standardised (float [0, 1] from scikit-image, rounded back)."""
    if image.min() == image.max():
        return image
    if mode == "equalize":
        # uint8 in: one histogram bin per grey level, so the result is exactly the CDF.
        y = exposure.equalize_hist(image)
    else:
        y = exposure.equalize_adapthist(image, clip_limit=CLAHE_CLIP)
    return np.round(np.clip(y, 0.0, 1.0) * 255.0).astype(np.uint8)
