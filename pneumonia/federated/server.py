"""The server: samples clients, checks and aggregates their updates, holds the global state.

It holds no dataset and imports nothing from `pneumonia.data`: all it ever receives from a
client is a `ClientUpdate` (state dict, count, mean loss and accuracy). With secure
aggregation (federated.secure_aggregation) not even that: a `SecureRound` holds each client's
clear-text count, loss, accuracy and epsilon, and only the weighted average of their states.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

import torch

from pneumonia.core.errors import UserError
from pneumonia.federated.aggregate import (
    ClientUpdate,
    State,
    UpdateChecks,
    update_norm,
    update_problem,
)
from pneumonia.federated.strategies import Strategy

SAVED = "The last completed round is saved: fix the cause and "


class ClientExcludedWarning(UserWarning):
    """A client's update was left out of a round's average."""


@dataclass
class SecureRound:
    """A round under secure aggregation, as the cohort hands it to the server."""

    updates: list[ClientUpdate]  # the members' clear-text metadata; `state` is empty
    aggregate: State | None  # their image-count-weighted average state; None: none came
    failures: dict[int, str]  # clients that dropped out, and why
    halted: str = ""  # why there is no aggregate


class Server:
    def __init__(
        self,
        global_state: State,
        strategy: Strategy,
        *,
        n_clients: int,
        per_round: int,
        min_clients: int,
        seed: int,
        checks: UpdateChecks | None = None,
        resume: str = "continue with --resume RUN_DIR",
    ) -> None:
        """The four counts are keyword-only (one int is easily passed for another). `resume`:
        what continues the run after a failed round (the run layer names it)."""
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
        self.resume = SAVED + resume

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
        self.warn_excluded(round_index, excluded)
        if len(valid) < self.min_clients:
            self.fail(round_index, len(valid), excluded)
        self.global_state = self.strategy.aggregate(self.global_state, valid)
        return sorted(excluded)

    def aggregate_secure(self, round_index: int, result: SecureRound) -> list[int]:
        """Apply a secure round's aggregate; return the clients left out (those that dropped
        out of the protocol: the cohort already removed them, masks and all).

        What can still be checked is: the members' clear-text counts against those declared
        (the cohort drops a liar inside the protocol; one found here is inside the sum and
        fails the round), `min_clients`, and the aggregate itself (structure, finite values,
        federated.max_update_norm on its change). A client's own norm, and its norm against
        the others' (update_norm_ratio), cannot be checked: no update is seen alone. The
        strategy then gets ONE update, the aggregate, weighted by the members' total count."""
        prefix = f"round {round_index + 1} failed"
        excluded = dict(result.failures)
        self.warn_excluded(round_index, excluded)
        liars = {u.client: why for u in result.updates if (why := self.checks.count_problem(u))}
        if liars:
            reasons = "; ".join(f"client {c}: {w}" for c, w in sorted(liars.items()))
            raise UserError(f"{prefix}: {reasons}, inside the secure sum. {self.resume}")
        if result.aggregate is None or len(result.updates) < self.min_clients:
            self.fail(round_index, len(result.updates), excluded, result.halted)
        total = sum(u.n for u in result.updates)
        mean = ClientUpdate(-1, result.aggregate, total, float("nan"), float("nan"))
        problem = update_problem(mean, self.global_state) or self.norm_problem(mean)
        if problem is not None:
            raise UserError(
                f"{prefix}: the secure aggregate of clients "
                f"{', '.join(str(u.client) for u in result.updates)} is unusable: {problem}; "
                f"secure aggregation cannot tell whose update caused it (a bound too tight "
                f"for honest updates needs a new run with a higher federated.max_update_norm: "
                f"a resume keeps the run's own). {self.resume}"
            )
        self.global_state = self.strategy.aggregate(self.global_state, [mean])
        return sorted(excluded)

    def norm_problem(self, mean: ClientUpdate) -> str | None:
        """The aggregate's change against max_update_norm: a weighted mean of changes within
        the bound is within it too, so one beyond it means some client's was."""
        norm = update_norm(mean, self.global_state)
        if self.checks.max_norm is not None and norm > self.checks.max_norm:
            return f"its update norm {norm:.3g} exceeds federated.max_update_norm"
        return None

    def warn_excluded(self, round_index: int, excluded: dict[int, str]) -> None:
        for client, why in sorted(excluded.items()):
            warnings.warn(
                f"round {round_index + 1}: client {client} left out: {why}",
                ClientExcludedWarning,
                stacklevel=3,
            )

    def fail(
        self, round_index: int, valid: int, excluded: dict[int, str], cause: str = ""
    ) -> NoReturn:
        """A round without enough valid updates: the global state stays, the run can resume."""
        reasons = "; ".join(f"client {c}: {w}" for c, w in sorted(excluded.items()))
        cause = f"{cause}; " if cause else ""
        raise UserError(
            f"round {round_index + 1} failed: {cause}{valid} valid update(s), "
            f"federated.min_clients is {self.min_clients} ({reasons}). {self.resume}"
        )

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
