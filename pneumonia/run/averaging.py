"""federated.average_rounds K: the reported model is the mean of the global models of the last
K rounds, integer buffers taken from the last round (FedAvg's own rule for them). The running
sum travels in the round state (`average_sum`), so a resumed run averages the same rounds."""

from __future__ import annotations

from pneumonia.federated.aggregate import State
from pneumonia.federated.options import averaged_rounds


class RoundAverage:
    """The sum of the global models of the averaged rounds seen so far (float64)."""

    def __init__(self, fed, total: State | None = None) -> None:
        self.k = averaged_rounds(fed)
        self.rounds = fed.rounds
        self.total = total

    @property
    def enabled(self) -> bool:
        return self.k > 0

    def add(self, round_number: int, state: State) -> None:
        """Add round `round_number`'s global model if it is one of the last K (else nothing)."""
        if round_number <= self.rounds - self.k:
            return
        if self.total is None:
            self.total = {k: v.double().clone() for k, v in state.items()}
        else:
            for k, v in state.items():
                self.total[k] += v.double()

    def complete(self, round_number: int) -> bool:
        """Whether the average is due: averaging, and the last round is done."""
        return self.enabled and round_number == self.rounds

    def mean(self, last: State) -> State:
        """The mean of the last K rounds' global models; `last`: the last round's, whose
        integer buffers (and dtypes) it keeps."""
        assert self.total is not None, "the average is due only after its rounds were added"
        return {
            name: (self.total[name] / self.k).to(v.dtype) if v.is_floating_point() else v
            for name, v in last.items()
        }
