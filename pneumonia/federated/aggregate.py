"""Weighted averages of whole state dicts, and the checks a client's update must pass.

Float tensors (weights, BatchNorm running statistics) are averaged weighted by each client's
sample count, in float64, then cast back. Integer buffers (BatchNorm's `num_batches_tracked`)
are counts, not weights: they get the weighted mean rounded half up, which keeps them a count
of the same order as each client's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

State = dict[str, torch.Tensor]


@dataclass
class ClientUpdate:
    """Everything that leaves a client after a round: weights, a count, two summary numbers."""

    client: int
    state: State
    n: int  # training images the client used (the FedAvg weight)
    train_loss: float  # mean training loss of its last local epoch
    train_accuracy: float


def weighted_average(states: Sequence[State], weights: Sequence[float]) -> State:
    """sum_j w_j * state_j / sum_j w_j, key by key; integer tensors rounded half up."""
    if not states:
        raise ValueError("no states to average")
    total = float(sum(weights))
    out: State = {}
    for key, first in states[0].items():
        acc = torch.zeros(first.shape, dtype=torch.float64)
        for state, w in zip(states, weights, strict=True):
            acc += state[key].detach().to("cpu", torch.float64) * (w / total)
        if first.is_floating_point():
            out[key] = acc.to(first.dtype)
        else:
            out[key] = torch.floor(acc + 0.5).to(first.dtype)
    return out


def update_problem(update: ClientUpdate, reference: State) -> str | None:
    """Why the server must not average `update` (None if it may)."""
    if update.n < 1:
        return f"it reports {update.n} training images"
    missing = sorted(reference.keys() - update.state.keys())
    extra = sorted(update.state.keys() - reference.keys())
    if missing or extra:
        return f"its state dict has missing keys {missing[:3]} / extra keys {extra[:3]}"
    for key, ref in reference.items():
        value = update.state[key]
        if not isinstance(value, torch.Tensor):
            return f"{key} is a {type(value).__name__}, not a tensor"
        if value.shape != ref.shape:
            return f"{key} has shape {tuple(value.shape)}, expected {tuple(ref.shape)}"
        if value.dtype != ref.dtype:
            return f"{key} has dtype {value.dtype}, expected {ref.dtype}"
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"{key} holds non-finite values"
    return None
