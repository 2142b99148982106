"""The checkpoint format, and its only owner: what `best.ckpt` and `last.ckpt` hold, how
they are written, read back and given a decision threshold.

A checkpoint is a dict loadable with torch.load(weights_only=True):
    state_dict        the module's weights (`model.*`)
    hyper_parameters  its `Recipe` (pneumonia.training.recipe): model, optim, image size, classes,
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
Everything else reads it with `read_checkpoint` or `load_module`, which trust no size in it:
its recipe must lie within the fit config's ranges (`Recipe.out_of_range`), every tensor must
hold the values its shape claims, and the tensors must fit the model its recipe names, built
first on the meta device (`module_from`), so that a file claiming a huge model costs nothing.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from pneumonia.core.errors import UserError, first_line
from pneumonia.core.files import save_atomic
from pneumonia.core.safeload import safe_load
from pneumonia.training.module import ClassifierModule, positive_indices
from pneumonia.training.recipe import Recipe, build_module


class CheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint reads and writes, through the package's one weights-only loader
    and its atomic writer."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Any = None) -> None:
        save_atomic(checkpoint, Path(path))

    def load_checkpoint(self, path, map_location: Any = None, weights_only: Any = None) -> dict:
        # What the file holds: Lightning checks it is one of its checkpoint dicts.
        return cast(dict, safe_load(path))


def write_checkpoint(path: Path, state: dict, recipe: Recipe, round_number: int) -> None:
    """A federated run's global model, in the format a centralized run's Lightning writes."""
    ckpt = {"state_dict": state, "hyper_parameters": recipe.hparams(), "epoch": round_number}
    save_atomic(ckpt | {"round": round_number}, path)


def checkpoint_round(path: str | Path) -> int:
    """The round a checkpoint was written after (`write_checkpoint`'s), -1 if it has none."""
    ckpt = safe_load(path, mmap=True)
    return int(ckpt.get("round", -1)) if isinstance(ckpt, dict) else -1


def read_checkpoint(path: str | Path) -> tuple[Recipe, dict, dict]:
    """(its recipe, its state dict, the whole checkpoint dict), or a one-line UserError."""
    ckpt = safe_load(path)
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if (
        not isinstance(ckpt, dict)
        or not isinstance(hparams, dict)
        or "model" not in hparams
        or "state_dict" not in ckpt
    ):
        raise UserError(f"{path} is not a checkpoint written by pneumonia.fit (no model hparams)")
    state = ckpt["state_dict"]
    if not isinstance(state, dict) or not all(_plain(v) for v in state.values()):
        raise UserError(f"{path}: its state_dict is not a dict of (dense, CPU) tensors")
    # A tensor can claim more elements than its file holds (zero strides over a small
    # storage): anything computed from it would take memory the file never had.
    hollow = next((k for k, v in state.items() if _elements_bytes(v) > _storage_bytes(v)), None)
    if hollow is not None:
        raise UserError(
            f"{path}: its tensor {str(hollow)[:80]} claims shape {tuple(state[hollow].shape)} "
            f"but holds fewer values: give a checkpoint written by pneumonia.fit"
        )
    return _recipe(hparams, path), state, ckpt


def _plain(value: object) -> bool:
    """A dense tensor with its values on the CPU (loaded there: not a meta or sparse one)."""
    return (
        isinstance(value, torch.Tensor)
        and value.layout == torch.strided
        and value.device.type == "cpu"
    )


def _elements_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _storage_bytes(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().nbytes()


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
    bad = recipe.out_of_range()
    if bad is not None:
        key, value, allowed = bad
        raise UserError(
            f"checkpoint {path}: {key} {repr(value)[:40]} is outside the range a run may have "
            f"({allowed}): give a checkpoint written by pneumonia.fit"
        )
    return recipe


def load_module(path: str | Path, threshold: float | None = None) -> ClassifierModule:
    """The ClassifierModule a checkpoint holds, deciding at its own threshold or `threshold`."""
    recipe, state, _ = read_checkpoint(path)
    if threshold is not None:
        recipe = recipe.with_threshold(threshold)
    return module_from(recipe, state, path)


def module_from(recipe: Recipe, state: dict, path: str | Path) -> ClassifierModule:
    """The module of a checkpoint already read (`path` names it in errors). Its weights come
    from `state` alone: the model.pretrained file it was trained from is not read (it may be
    long gone, or be anything)."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UserError(
            f"checkpoint {path} holds non-finite weights ({bad[0]}"
            f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}): it cannot be scored; "
            f"use an earlier checkpoint of the run"
        )
    recipe = replace(recipe, model=recipe.model | {"pretrained": None})
    _check_shapes(recipe, state, path)
    module = _build(recipe, path)
    _load(module, state, recipe, path)
    return module


def _check_shapes(recipe: Recipe, state: dict, path: str | Path) -> None:
    """What the file claims of its model must match the tensors it holds before the model
    takes memory of its own: checked on the meta device, allocating nothing."""
    try:
        with torch.device("meta"):
            module = build_module(recipe)
    # Some heads cannot be built without data (pytorch-metric-learning's margin losses make
    # numpy arrays), and any error of the recipe's recurs in the real build, which reports
    # it: the sizes it may allocate are within the config's ranges (`read_checkpoint`).
    except Exception:
        return
    _load(module, state, recipe, path, assign=True)


def _build(recipe: Recipe, path: str | Path) -> ClassifierModule:
    try:
        return build_module(recipe)
    except (TypeError, ValueError, KeyError) as err:
        raise UserError(
            f"checkpoint {path}: cannot build its model: {first_line(err, 120)}"
        ) from None


def _load(
    module: ClassifierModule, state: dict, recipe: Recipe, path: str | Path, assign: bool = False
) -> None:
    """`module.load_state_dict(state)`, or a one-line UserError naming the first mismatch."""
    try:
        module.load_state_dict(state, assign=assign)
    except RuntimeError as err:
        # Its first line only says "Error(s) in loading state_dict": the next names the key.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise UserError(
            f"checkpoint {path} does not match model {recipe.model.get('name')!r} it names: "
            f"{(lines[1] if len(lines) > 1 else first_line(err))[:160]}"
        ) from None


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
