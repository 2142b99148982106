"""Reading checkpoints and weight files without executing pickled code."""

from __future__ import annotations

from pathlib import Path

import torch

from pneumonia.core.errors import UserError


def safe_load(path: str | Path, mmap: bool = False) -> object:
    """torch.load with weights_only=True: tensors and plain containers only, never code.
    `mmap`: map the tensors instead of reading them, for a glance at a checkpoint's plain
    values (its epoch or round) that should not cost a read of every weight."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a file: {_inside(path)}")
    if path.exists() and not path.is_file():  # a pipe or a device: never read (it may not end)
        raise UserError(f"{path} is not a regular file: give a checkpoint or weights file")
    if not path.is_file():
        raise UserError(f"{path} does not exist: check the checkpoint or weights path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    # Junk bytes surface as nearly any exception type: UnpicklingError, KeyError,
    # IndexError, UnicodeDecodeError, EOFError, ... Every one means the same to the user.
    except Exception:
        raise UserError(
            f"cannot read {path}: not a PyTorch checkpoint, or it holds pickled objects beyond "
            f"tensors and plain containers (refused: loading them could run code)"
        ) from None


def _inside(folder: Path) -> str:
    """What to give instead of a folder: the best.ckpt in it or in its run's checkpoints/."""
    for candidate in (folder / "checkpoints" / "best.ckpt", folder / "best.ckpt"):
        if candidate.is_file():
            return f"give the checkpoint inside it, {candidate}"
    return "give a checkpoint file, such as a run's checkpoints/best.ckpt"
