"""The checkpoint format, and its only owner: what `best.ckpt` and `last.ckpt` hold, how
they are written, read back and given a decision threshold.

A checkpoint is a dict loadable with torch.load(weights_only=True):
    state_dict        the module's weights (`model.*`)
    hyper_parameters  its `Recipe` (pneumonia.recipe): model, optim, image size, classes,
                      normalisation, threshold
    epoch             the epoch (centralized) or round (federated) it was taken at
    round             federated runs only: the round again
Centralized runs have Lightning write it (ModelCheckpoint, which adds the Trainer's state);
federated runs write the same keys with `write_checkpoint`. Everything reads it with
`read_checkpoint` or `load_module`.
"""

from __future__ import annotations

from pathlib import Path

from pneumonia.errors import UserError, first_line
from pneumonia.files import save_atomic
from pneumonia.module import ClassifierModule
from pneumonia.recipe import Recipe, build_module
from pneumonia.safeload import safe_load


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
    return Recipe.from_hparams(hparams), ckpt["state_dict"], ckpt


def load_module(path: str | Path, threshold: float | None = None) -> ClassifierModule:
    """The ClassifierModule a checkpoint holds, deciding at its own threshold or `threshold`."""
    recipe, state, _ = read_checkpoint(path)
    if threshold is not None:
        recipe = recipe.with_threshold(threshold)
    return module_from(recipe, state, path)


def module_from(recipe: Recipe, state: dict, path: str | Path) -> ClassifierModule:
    """The module of a checkpoint already read (`path` names it in errors)."""
    module = build_module(recipe)
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
