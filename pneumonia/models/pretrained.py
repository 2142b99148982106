"""Load ImageNet-pretrained weights from a local file into a 1-channel, 2-class model."""

from __future__ import annotations

from pathlib import Path

import torch
from timm.models import adapt_input_conv
from torch import nn

from pneumonia.core.errors import UserError
from pneumonia.core.safeload import safe_load


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a state-dict file or a checkpoint, loaded without executing pickled code."""
    obj = safe_load(path)
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path} holds no state dict of tensors")
    # Lightning checkpoints of our module prefix every key with "model.".
    return {k.removeprefix("model."): v for k, v in obj.items()}


def load_pretrained(model: nn.Module, path: str | Path) -> int:
    """Copy matching tensors into `model`; RGB stems are summed to 1 channel, heads skipped.

    Returns how many tensors were loaded; raises if none match (weights of another network).
    """
    source = read_state_dict(path)
    target = model.state_dict()
    loaded = {}
    for key, value in source.items():
        if key not in target:
            continue
        want = target[key].shape
        if value.ndim == 4 and value.shape[1] != want[1] and value.shape[0] == want[0]:
            value = adapt_input_conv(want[1], value)
        if value.shape == want:
            loaded[key] = value
    if not loaded:
        raise UserError(
            f"no tensor in {path} fits this model: are these weights of another network?"
        )
    model.load_state_dict(loaded, strict=False)
    return len(loaded)
