"""The after-every-round checkpoint that `python -m pneumonia.fit --resume RUN_DIR` reads.

checkpoints/federated_state.pt holds the server (global state dict, strategy state, client
sampler), every client's own state (FedBN norm layers, optimizer state, step count), the
round history, the best round so far and the process RNG states. It is written to a temporary
file and renamed, so a run killed at any moment leaves the previous round's file intact.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import cast

import numpy as np
import torch

from pneumonia.core.files import save_atomic
from pneumonia.core.safeload import safe_load

STATE_FILE = "federated_state.pt"
MT19937State = tuple[str, np.ndarray, int, int, float]  # name, keys, pos, has_gauss, cached


def rng_state() -> dict:
    """Python, NumPy and torch RNG states, as tensors and ints (loadable with weights_only)."""
    # The global RandomState is an MT19937, whose legacy state is this tuple (NumPy's stub
    # also allows the dict other bit generators give).
    legacy = cast(MT19937State, np.random.get_state(legacy=True))
    name, keys, pos, has_gauss, cached = legacy
    return {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def save_round_state(checkpoints: Path, state: dict) -> Path:
    """Write `state` (plus the RNG states) atomically to checkpoints/federated_state.pt."""
    checkpoints.mkdir(parents=True, exist_ok=True)
    path = checkpoints / STATE_FILE
    save_atomic(state | {"rng": rng_state()}, path)
    return path


def load_round_state(run_dir: Path) -> dict | None:
    """The last completed round's state of `run_dir`, or None if no round completed."""
    path = Path(run_dir) / "checkpoints" / STATE_FILE
    if not path.is_file():
        return None
    # An unreadable file ends in safe_load's one-line error; a readable one is the dict
    # save_round_state wrote (the resume reads its keys).
    return cast(dict, safe_load(path))
