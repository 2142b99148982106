"""The checkpoint format, and its only owner: what `best.ckpt` and `last.ckpt` hold, how
they are written, read back and given a decision threshold.

A checkpoint is a dict loadable with torch.load(weights_only=True):
    state_dict        the module's weights (`model.*`)
    hyper_parameters  its `Recipe` (pneumonia.recipe): model, optim, image size, classes,
                      normalisation, threshold
    epoch             the epoch (centralized) or round (federated) it was taken at
    round             federated runs only: the round again
    model_card        best.ckpt only: what the model was trained on, how it was chosen, its
                      validation and shift-validation figures with 95% intervals (plain
                      values; `model_card` reads it, `finish_checkpoint` writes it)
Centralized runs have Lightning write it (ModelCheckpoint, which adds the Trainer's state)
through `CheckpointIO`, so that Lightning too writes atomically and reads back weights-only
(Lightning's own reader honours TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, which would let a crafted
last.ckpt run code on --resume); federated runs write the same keys with `write_checkpoint`.
Everything else reads it with `read_checkpoint` or `load_module`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from pneumonia.errors import UserError, first_line
from pneumonia.files import save_atomic
from pneumonia.module import ClassifierModule, positive_indices
from pneumonia.recipe import Recipe, build_module
from pneumonia.safeload import safe_load


class CheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint reads and writes, through the package's one weights-only loader
    and its atomic writer."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Any = None) -> None:
        save_atomic(checkpoint, Path(path))

    def load_checkpoint(self, path, map_location: Any = None, weights_only: Any = None) -> dict:
        return safe_load(path)


def write_checkpoint(path: Path, state: dict, recipe: Recipe, round_number: int) -> None:
    """A federated run's global model, in the format a centralized run's Lightning writes."""
    ckpt = {"state_dict": state, "hyper_parameters": recipe.hparams(), "epoch": round_number}
    save_atomic(ckpt | {"round": round_number}, path)


def read_checkpoint(path: str | Path) -> tuple[Recipe, dict, dict]:
    """(its recipe, its state dict, the whole checkpoint dict), or a one-line UserError."""
    ckpt = safe_load(path)
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hparams, dict) or "model" not in hparams or "state_dict" not in ckpt:
        raise UserError(f"{path} is not a checkpoint written by pneumonia.fit (no model hparams)")
    state = ckpt["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: its state_dict is not a dict of tensors")
    return _recipe(hparams, path), state, ckpt


def _recipe(hparams: dict, path: str | Path) -> Recipe:
    """The checkpoint's recipe, checked as far as building a module needs."""
    try:
        recipe = Recipe.from_hparams(hparams)
        valid = (
            isinstance(recipe.model, dict)
            and isinstance(recipe.model.get("name"), str)
            and isinstance(recipe.optim, dict)
            and isinstance(recipe.image_size, int)
            and float(recipe.std) > 0
            and 0 < float(recipe.threshold) < 1
            and len(recipe.classes) in (2, 3)
            and len(positive_indices(tuple(recipe.classes), recipe.positive_class)) >= 1
        )
    except (TypeError, ValueError, UserError):
        valid = False
    if not valid:
        raise UserError(
            f"{path}: its hyper-parameters are not those of a pneumonia.fit model (model, "
            f"image_size, classes, normalisation, threshold): was it written by another program?"
        )
    return recipe


def load_module(path: str | Path, threshold: float | None = None) -> ClassifierModule:
    """The ClassifierModule a checkpoint holds, deciding at its own threshold or `threshold`."""
    recipe, state, _ = read_checkpoint(path)
    if threshold is not None:
        recipe = recipe.with_threshold(threshold)
    return module_from(recipe, state, path)


def module_from(recipe: Recipe, state: dict, path: str | Path) -> ClassifierModule:
    """The module of a checkpoint already read (`path` names it in errors)."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UserError(
            f"checkpoint {path} holds non-finite weights ({bad[0]}"
            f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}): it cannot be scored; "
            f"use an earlier checkpoint of the run"
        )
    try:
        module = build_module(recipe)
    except (TypeError, ValueError, KeyError) as err:
        raise UserError(
            f"checkpoint {path}: cannot build its model: {first_line(err, 120)}"
        ) from None
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(
            f"checkpoint {path} does not match model {recipe.model.get('name')!r} it names: "
            f"{first_line(err, 120)}"
        ) from None
    return module


def set_threshold(path: Path, ckpt: dict, threshold: float) -> None:
    """Write the run's chosen decision threshold into a checkpoint (`ckpt`, as read from
    `path`), so that everything that loads it decides as the run reported."""
    ckpt["hyper_parameters"]["threshold"] = float(threshold)
    save_atomic(ckpt, Path(path))


def finish_checkpoint(path: Path, ckpt: dict, threshold: float, card: dict) -> None:
    """The reported model's last write: its decision threshold and its model card."""
    ckpt["model_card"] = card
    set_threshold(path, ckpt, threshold)


def model_card(ckpt: dict) -> dict:
    """The checkpoint's model card, or {} when it has none (last.ckpt, older runs)."""
    card = ckpt.get("model_card")
    return card if isinstance(card, dict) else {}
