"""federated.average_rounds K: the reported model is the mean of the global models of the last
K rounds, integer buffers taken from the last round (FedAvg's own rule for them).

The round state keeps what a resume needs to average the same rounds, and no more: the global
models of the window's rounds before the latest (at most K - 1, as they are), since the latest
is the server's global state, saved beside them; after the last round, when the average is
written, K - 2 (but all of them when K exceeds the rounds: every round is averaged, and more
rounds keep the window's start at round 1). The mean sums them in float64 in round order when
it is due, so a resumed run reports the same bits as an uninterrupted one. A run given more
rounds on --resume averages its new last K rounds: its window moves at least one round later,
so every round it needs that was trained before is among those kept.

Round states written before this rule hold the running float64 sum instead (`average_sum`);
a resume of one goes on adding to that sum, which holds only while the window stays put.
"""

from __future__ import annotations

from pneumonia.core.errors import UserError
from pneumonia.federated.aggregate import State
from pneumonia.federated.options import averaged_rounds

Window = dict[int, State]  # round number -> its global model


class RoundAverage:
    """The global models of the averaged rounds seen so far."""

    def __init__(self, fed) -> None:
        self.k = averaged_rounds(fed)
        self.rounds = fed.rounds
        # K > rounds averages every round: given more rounds its window still starts at 1.
        self.window_moves = 0 < fed.average_rounds <= fed.rounds
        self.models: Window = {}
        self.legacy_sum: State | None = None  # a round state of the running-sum layout

    @property
    def enabled(self) -> bool:
        return self.k > 0

    @property
    def first(self) -> int:
        """The window's first round (from 1)."""
        return self.rounds - self.k + 1

    def add(self, round_number: int, state: State) -> None:
        """Keep round `round_number`'s global model if it is one of the last K (else nothing)."""
        if not self.enabled or round_number < self.first:
            return
        if self.legacy_sum is not None:
            for k, v in state.items():
                self.legacy_sum[k] += v.double()
            return
        # A copy: a strategy may update the global tensors in place next round.
        self.models[round_number] = {k: v.detach().clone() for k, v in state.items()}

    def complete(self, round_number: int) -> bool:
        """Whether the average is due: averaging, and the last round is done."""
        return self.enabled and round_number == self.rounds

    def mean(self, last: State) -> State:
        """The mean of the last K rounds' global models; `last`: the last round's, whose
        integer buffers (and dtypes) it keeps."""
        total = self.legacy_sum if self.legacy_sum is not None else self._sum()
        return {
            name: (total[name] / self.k).to(v.dtype) if v.is_floating_point() else v
            for name, v in last.items()
        }

    def _sum(self) -> State:
        """The float64 sum of the window's models, added in round order."""
        rounds = sorted(self.models)
        assert len(rounds) == self.k, "the average is due only after its rounds were added"
        total = {k: v.double().clone() for k, v in self.models[rounds[0]].items()}
        for r in rounds[1:]:
            for k, v in self.models[r].items():
                total[k] += v.double()
        return total

    def state_dict(self, current_round: int) -> dict:
        """What the round state keeps after round `current_round`: the window's models before
        it (its own is the server's global state, saved beside them). Once the average is
        written (the last round), the window's first round goes too: a resume given more
        rounds moves the window at least one round later."""
        if self.legacy_sum is not None:
            return {"average_sum": self.legacy_sum}
        done = current_round >= self.rounds and self.window_moves
        start = self.first + 1 if done else self.first
        kept = {r: s for r, s in self.models.items() if start <= r < current_round}
        return {"average_models": kept}

    def load_state_dict(
        self, state: dict, current_round: int, global_state: State, planned: int
    ) -> None:
        """Restore after round `current_round`, whose global model is `global_state`, from a
        round state saved by a run planned for `planned` rounds."""
        if state.get("average_sum") is not None:
            self._load_legacy(state["average_sum"], planned)
            return
        saved: Window = {int(r): s for r, s in (state.get("average_models") or {}).items()}
        self.models = {}
        for r in sorted(saved):
            self.add(r, saved[r])
        self.add(current_round, global_state)

    def _load_legacy(self, total: State, planned: int) -> None:
        """A running sum of the window's rounds so far (round states written before the models
        were kept): exact only while the window is the one it was summed over."""
        if planned != self.rounds:
            raise UserError(
                f"federated.rounds {planned} -> {self.rounds}: this run's round state keeps "
                f"the sum of its averaged rounds, not their models, so the average cannot "
                f"move to the new last rounds: resume it with federated.rounds {planned}, or "
                f"start a new run"
            )
        self.legacy_sum = total
