"""Weighted averages of whole state dicts, and the checks a client's update must pass
(`UpdateChecks`: its structure, the image count it declared, and its size).

Float tensors (weights, BatchNorm running statistics) are averaged weighted by each client's
sample count, in float64, then cast back. Integer buffers (BatchNorm's `num_batches_tracked`)
are counts, not weights: they get the weighted mean rounded half up, which keeps them a count
of the same order as each client's.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

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
    # DP-SGD (privacy.enabled): the client's (epsilon, delta) after this round, from its own
    # accountant; None without differential privacy on the client.
    epsilon: float | None = None


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


def update_norm(update: ClientUpdate, reference: State) -> float:
    """||w_client - w_global||: the L2 norm of the change to every float tensor."""
    total = 0.0
    for key, ref in reference.items():
        if ref.is_floating_point():
            diff = update.state[key].detach().to("cpu", torch.float64) - ref.to(torch.float64)
            total += float(diff.pow(2).sum())
    return total**0.5


@dataclass
class UpdateChecks:
    """What the server demands of each update before it averages it.

    Beyond a well-formed state dict (`update_problem`): the image count the client declared
    when the run started (its data query: a client cannot claim 10^9 images to take over the
    average), and a size bound on the update, relative to the round's others (a norm above
    `norm_ratio` x the median norm of the other updates; 0: off) and absolute (`max_norm`)."""

    declared: Mapping[int, int] = field(default_factory=dict)  # client -> training images
    norm_ratio: float = 0.0
    max_norm: float | None = None

    def problems(self, updates: Sequence[ClientUpdate], reference: State) -> dict[int, str]:
        """Client -> why its update must be left out, for every update that fails."""
        out = {}
        for update in updates:
            problem = update_problem(update, reference) or self.count_problem(update)
            if problem is not None:
                out[update.client] = problem
        sound = [u for u in updates if u.client not in out]
        out |= self.norm_problems(sound, reference)
        return out

    def count_problem(self, update: ClientUpdate) -> str | None:
        declared = self.declared.get(update.client)
        if declared is not None and update.n != declared:
            return (
                f"it reports {update.n} training images, but declared {declared} when the run "
                f"started"
            )
        return None

    def norm_problems(self, updates: Sequence[ClientUpdate], reference: State) -> dict[int, str]:
        norms = {u.client: update_norm(u, reference) for u in updates}
        out = {}
        for client, norm in norms.items():
            others = [v for c, v in norms.items() if c != client]
            if self.max_norm is not None and norm > self.max_norm:
                out[client] = (
                    f"its update norm {norm:.3g} exceeds federated.max_update_norm "
                    f"{self.max_norm:g}"
                )
            elif self.norm_ratio > 0 and others:
                typical = statistics.median(others)
                if norm > self.norm_ratio * typical:
                    out[client] = (
                        f"its update norm {norm:.3g} is {norm / max(typical, 1e-30):.3g} x the "
                        f"median of the others' ({typical:.3g}), above "
                        f"federated.update_norm_ratio {self.norm_ratio:g}"
                    )
        return out
