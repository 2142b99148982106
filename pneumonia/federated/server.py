"""The server: samples clients, checks and aggregates their updates, holds the global state.

It holds no dataset and imports nothing from `pneumonia.data`: all it ever receives from a
client is a `ClientUpdate` (state dict, count, mean loss and accuracy).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from pneumonia.errors import UserError
from pneumonia.federated.aggregate import ClientUpdate, State, UpdateChecks
from pneumonia.federated.strategies import FedAvg


class ClientExcludedWarning(UserWarning):
    """A client's update was left out of a round's average."""


class Server:
    def __init__(
        self,
        global_state: State,
        strategy: FedAvg,
        n_clients: int,
        per_round: int,
        min_clients: int,
        seed: int,
        checks: UpdateChecks | None = None,
    ) -> None:
        if min_clients > per_round:
            raise UserError(
                f"federated.min_clients {min_clients} is more than the {per_round} client(s) "
                f"sampled per round: lower it or raise federated.fraction"
            )
        self.global_state = {k: v.detach().to("cpu", copy=True) for k, v in global_state.items()}
        self.strategy = strategy
        self.n_clients, self.per_round, self.min_clients = n_clients, per_round, min_clients
        self.sampler = torch.Generator().manual_seed(seed)
        self.checks = checks or UpdateChecks()

    def sample_clients(self) -> list[int]:
        """The clients of the next round, drawn without replacement (sorted)."""
        if self.per_round == self.n_clients:
            return list(range(self.n_clients))
        chosen = torch.randperm(self.n_clients, generator=self.sampler)[: self.per_round]
        return sorted(chosen.tolist())

    def aggregate(
        self, round_index: int, updates: Sequence[ClientUpdate], failures: dict[int, str]
    ) -> list[int]:
        """Average the valid updates into the global state; return the clients left out.

        `failures` names clients that raised, with why. Updates that fail the checks are left
        out with a warning naming the client; fewer than `min_clients` valid ones fail the
        round, the global state untouched.
        """
        excluded = dict(failures) | self.checks.problems(updates, self.global_state)
        valid = [u for u in updates if u.client not in excluded]
        for client, why in sorted(excluded.items()):
            warnings.warn(
                f"round {round_index + 1}: client {client} left out: {why}",
                ClientExcludedWarning,
                stacklevel=2,
            )
        if len(valid) < self.min_clients:
            reasons = "; ".join(f"client {c}: {w}" for c, w in sorted(excluded.items()))
            raise UserError(
                f"round {round_index + 1} failed: {len(valid)} valid update(s), "
                f"federated.min_clients is {self.min_clients} ({reasons}). The last completed "
                f"round is saved: fix the cause and continue with --resume RUN_DIR"
            )
        self.global_state = self.strategy.aggregate(self.global_state, valid)
        return sorted(excluded)

    def state_dict(self) -> dict:
        return {
            "global_state": self.global_state,
            "strategy": self.strategy.state_dict(),
            "sampler": self.sampler.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.global_state = state["global_state"]
        self.strategy.load_state_dict(state["strategy"])
        self.sampler.set_state(state["sampler"])
