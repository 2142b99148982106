"""What a federated run keeps of its rounds: rounds.csv's rows, the best round so far, the
average of the last rounds, and the files written after every round (rounds.csv, best.ckpt,
last.ckpt, then the round state that --resume restores: each atomic, the state last).

The round state holds what an exact resume needs and nothing twice: the server (global model,
strategy state, sampler), each client's own state, the history, the best round, the averaged
rounds' models but the latest (`pneumonia.run.averaging`), the RNG states and the rounds it was
planned for. A resume may add rounds (`pneumonia.run.rundir.check_resume_config` says when),
never take away rounds already trained."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from jsonargparse import Namespace

from pneumonia.core.errors import UserError
from pneumonia.core.files import write_csv
from pneumonia.federated.aggregate import State
from pneumonia.federated.cohort import Cohort
from pneumonia.federated.server import Server
from pneumonia.federated.state import load_round_state, save_round_state, set_rng_state
from pneumonia.run.averaging import RoundAverage
from pneumonia.run.config import monitor_mode
from pneumonia.run.monitor import Best
from pneumonia.run.rundir import BEST, LAST, ROUNDS, checkpoints_dir, trained_under
from pneumonia.run.selection import monitor_column
from pneumonia.training.checkpoint import write_checkpoint
from pneumonia.training.recipe import Recipe

log = logging.getLogger(__name__)


class RoundRecord:
    """The rounds a federated run has done, saved after each and restored on --resume."""

    def __init__(self, cfg: Namespace, recipe: Recipe, run_dir: Path, fingerprint: str) -> None:
        self.cfg, self.recipe, self.run_dir = cfg, recipe, run_dir
        self.fingerprint = fingerprint  # which images: a resume must see the same
        self.history: list[dict] = []  # rounds.csv's rows
        self.best = Best(0, math.nan)
        self.average = RoundAverage(cfg.federated)
        self.next_round = 0
        self.elapsed_before = 0.0  # seconds the rounds before a resume took

    def add(self, row: dict, server: Server, cohort: Cohort) -> None:
        """Record a completed round (its rounds.csv row) and save what it leaves."""
        self.history.append(row)
        # rounds.csv before the resume state: a kill between them leaves a row the next
        # round rewrites, never a saved round without its row.
        write_csv(self.run_dir / ROUNDS, self.history)
        self.checkpoint(row, server, cohort)

    def checkpoint(self, row: dict, server: Server, cohort: Cohort) -> None:
        """best.ckpt, last.ckpt, then the resume state: all atomic, the state last."""
        round_number, state = row["round"], server.global_state
        checkpoints_dir(self.run_dir).mkdir(parents=True, exist_ok=True)
        value = row[monitor_column(self.cfg.monitor)]
        improved = self.improves(value)
        if improved:
            self.best = Best(round_number, value)
        self.average.add(round_number, state)
        reported = self.reported_state(round_number, state, improved)
        if reported is not None:
            self.write(BEST, reported, round_number)
        self.write(LAST, state, round_number)
        save_round_state(checkpoints_dir(self.run_dir), self.state_dict(row, server, cohort))

    def improves(self, value: float) -> bool:
        """Whether `value` of the monitored metric beats the best round so far."""
        if self.best.step == 0:
            return True
        lower = monitor_mode(self.cfg.monitor) == "min"
        return value < self.best.value if lower else value > self.best.value

    def reported_state(self, round_number: int, state: State, improved: bool) -> State | None:
        """What best.ckpt holds after this round, None to leave it: the average once the last
        round is done (federated.average_rounds), else the round's model when it improved."""
        if self.average.enabled:
            return self.average.mean(state) if self.average.complete(round_number) else None
        return state if improved else None

    def write(self, name: str, state: State, round_number: int) -> None:
        write_checkpoint(checkpoints_dir(self.run_dir) / name, state, self.recipe, round_number)

    def state_dict(self, row: dict, server: Server, cohort: Cohort) -> dict:
        """The round state (pneumonia.federated.state adds the RNG states)."""
        return {
            "round": row["round"],
            "server": server.state_dict(),
            "clients": cohort.state_dict(),
            "history": self.history,
            "best": list(self.best),
            **self.average.state_dict(row["round"]),
            "planned_rounds": self.cfg.federated.rounds,
            "elapsed_s": row["elapsed_s"],
            "fingerprint": self.fingerprint,
        }

    def restore(self, server: Server, cohort: Cohort) -> None:
        """Continue after the last completed round saved in the run directory."""
        state = self.saved_state()
        done, rounds = int(state["round"]), self.cfg.federated.rounds
        server.load_state_dict(state["server"])
        cohort.load_state_dict(state["clients"])
        self.history, self.best = list(state["history"]), Best(*state["best"])
        self.average = RoundAverage(self.cfg.federated)
        self.average.load_state_dict(state, done, server.global_state, self.planned(state))
        self.next_round, self.elapsed_before = done, float(state["elapsed_s"])
        set_rng_state(state["rng"])
        log.info(f"resuming {self.run_dir} after round {done}/{rounds}")

    def saved_state(self) -> dict:
        """The round state to continue from, refused in one line where it cannot be."""
        state = load_round_state(self.run_dir)
        if state is None:
            raise UserError(
                f"{self.run_dir} has no completed round to resume from: start a new run"
            )
        if state["fingerprint"] != self.fingerprint:
            raise UserError(
                f"{self.run_dir}: the data or partition differs from when the run started "
                f"(data.root changed?): resume needs the same images"
            )
        done, rounds = int(state["round"]), self.cfg.federated.rounds
        if done > rounds:
            raise UserError(
                f"{self.run_dir} has trained {done} rounds, more than federated.rounds "
                f"{rounds}: resume with --federated.rounds {done} or more"
            )
        planned = self.planned(state)
        if done < planned and rounds < planned:  # stopped inside a longer plan
            raise UserError(
                f"{self.run_dir} was stopped after round {done} of {planned} planned: resume "
                f"with --federated.rounds {planned} or more"
            )
        return state

    def planned(self, state: dict) -> int:
        """The rounds the saved state was trained for: its own record, else (a round state
        from before it kept one) the config its checkpoints were trained under."""
        recorded = state.get("planned_rounds") or trained_under(self.run_dir, "federated.rounds")
        return int(recorded) if isinstance(recorded, int) else self.cfg.federated.rounds
