"""Reading checkpoints and weight files without executing pickled code."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from pneumonia.errors import UserError
from pneumonia.module import ClassifierModule


def safe_load(path: str | Path) -> object:
    """torch.load with weights_only=True: tensors and plain containers only, never code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist: check the checkpoint or weights path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError):
        raise UserError(
            f"cannot read {path}: not a PyTorch checkpoint, or it holds pickled objects beyond "
            f"tensors and plain containers (refused: loading them could run code)"
        ) from None


def load_module(path: str | Path) -> ClassifierModule:
    """Rebuild the ClassifierModule a checkpoint of `pneumonia.fit` was written by."""
    ckpt = safe_load(path)
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hparams, dict) or "model" not in hparams or "state_dict" not in ckpt:
        raise UserError(f"{path} is not a checkpoint written by pneumonia.fit (no model hparams)")
    module = ClassifierModule(**hparams)
    try:
        module.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        detail = str(err).splitlines()[0][:120]
        raise UserError(
            f"checkpoint {path} does not match model {hparams['model'].get('name')!r} it names: "
            f"{detail}"
        ) from None
    return module
