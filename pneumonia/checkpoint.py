"""Rebuilding the LightningModule from a checkpoint written by `pneumonia.fit`."""

from __future__ import annotations

from pathlib import Path

from pneumonia.errors import UserError
from pneumonia.module import ClassifierModule
from pneumonia.safeload import safe_load


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
