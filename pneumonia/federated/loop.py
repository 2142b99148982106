"""The federated rounds (the paper's Algorithms 1 and 2). It calls the stages, it holds none:
the clients (cohort: simulated in this process, or SuperNodes over Flower), aggregation
(server, strategies), evaluation, the round checkpoint (state) and the monitoring (monitor)."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch
from jsonargparse import Namespace
from lightning.pytorch.loggers import TensorBoardLogger

from pneumonia.centralized import Progress
from pneumonia.data.partition import format_table
from pneumonia.data.sources import Splits
from pneumonia.errors import UserError
from pneumonia.evaluation import evaluate_imageset
from pneumonia.federated.cohort import Cohort, LocalCohort, Moments, RoundTask
from pneumonia.federated.config import (
    averaged_rounds,
    check_federated,
    clients_per_round,
    round_lr_scale,
)
from pneumonia.federated.monitor import log_round, progress_line, round_row
from pneumonia.federated.server import Server
from pneumonia.federated.state import load_round_state, save_round_state, set_rng_state
from pneumonia.federated.strategies import create_strategy
from pneumonia.module import ClassifierModule
from pneumonia.rundir import save_atomic, write_csv


def agreed_normalisation(moments: list[Moments]) -> tuple[float, float]:
    """Pixel mean and std of all clients' images from each client's own moments."""
    total = sum(n for n, _, _ in moments)
    mean = sum(n * m for n, m, _ in moments) / total
    mean_sq = sum(n * s for n, _, s in moments) / total
    return round(mean, 4), round(max(mean_sq - mean * mean, 0.0) ** 0.5, 4)


def save_global(path: Path, state: dict, hparams: dict, round_number: int) -> None:
    """A checkpoint `pneumonia.evaluate` reads like one of a centralized run."""
    ckpt = {"state_dict": state, "hyper_parameters": hparams, "epoch": round_number}
    save_atomic(ckpt | {"round": round_number}, path)


class FederatedRun:
    """The state of one federated run between rounds."""

    def __init__(
        self, cfg: Namespace, splits: Splits, trainer_args: dict, cohort: Cohort | None = None
    ):
        """Partition, clients, agreed normalisation, global model, strategy and server: every
        configuration error surfaces here, before a run directory exists. The clients are
        simulated in this process unless a `cohort` (e.g. SuperNodes over Flower) is given;
        the server evaluates on `splits.val` (and `splits.test`)."""
        fed = cfg.federated
        check_federated(fed)
        self.cfg, self.splits = cfg, splits
        self.cohort = cohort if cohort is not None else LocalCohort(cfg, splits, trainer_args)
        self.table = self.cohort.table
        self.fingerprint = self.cohort.fingerprint()
        mean, std = agreed_normalisation(self.cohort.moments())
        self.hparams = {
            "model": dict(vars(cfg.model)),
            "optim": dict(vars(cfg.optim)),
            "image_size": cfg.data.image_size,
            "classes": list(splits.train.classes),
            "positive_class": cfg.positive_class,
            "mean": mean,
            "std": std,
        }
        # The global model first: its initialisation is the run's (the seed's) initialisation.
        self.module = ClassifierModule(**self.hparams)
        self.strategy = create_strategy(fed, self.module)
        per_round = clients_per_round(fed.fraction, len(self.cohort))
        self.server = Server(
            self.module.state_dict(),
            self.strategy,
            len(self.cohort),
            per_round,
            fed.min_clients,
            cfg.seed,
        )
        accelerator = trainer_args.get("accelerator", "auto")
        on_cuda = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
        self.device = "cuda" if on_cuda else "cpu"
        self.history: list[dict] = []
        self.best = (0, float("nan"))
        # Sum of the global states of the rounds averaged so far (federated.average_rounds).
        self.average_sum: dict[str, torch.Tensor] | None = None
        self.next_round = 0
        self.elapsed_before = 0.0
        self.run_dir: Path | None = None
        self.progress: Progress | None = None

    def attach(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.cohort.attach(self.hparams, run_dir, self.strategy)

    def resume(self, state: dict) -> None:
        if state["fingerprint"] != self.fingerprint:
            raise UserError(
                f"{self.run_dir}: the data or partition differs from when the run started "
                f"(data.root changed?): resume needs the same images"
            )
        self.server.load_state_dict(state["server"])
        self.cohort.load_state_dict(state["clients"])
        self.history, self.best = list(state["history"]), tuple(state["best"])
        self.average_sum = state.get("average_sum")
        self.next_round, self.elapsed_before = int(state["round"]), float(state["elapsed_s"])
        set_rng_state(state["rng"])

    def train_clients(self, round_index: int) -> tuple[list, dict[int, str]]:
        """The sampled clients train from the global state; failures are noted, not raised."""
        fed = self.cfg.federated
        lr = self.cfg.optim.lr * round_lr_scale(fed.round_lr, round_index, fed.rounds)
        task = RoundTask(self.server.global_state, round_index, fed.local_epochs, lr)
        return self.cohort.train(self.server.sample_clients(), task)

    def evaluate(self) -> dict[str, dict]:
        """Global model metrics on the validation (and test) images after a round."""
        self.module.load_state_dict(self.server.global_state)
        bs = self.cfg.data.eval_batch_size
        out = {
            name: evaluate_imageset(self.module, imageset, bs, self.device)[0]
            for name, imageset in self.splits.evaluation_sets().items()
        }
        self.module.cpu()
        return out

    def is_better(self, value: float) -> bool:
        if self.best[0] == 0:
            return True
        lower = self.cfg.monitor.endswith("loss")
        return value < self.best[1] if lower else value > self.best[1]

    def checkpoint(self, round_number: int, row: dict) -> None:
        """best.ckpt, last.ckpt, then the resume state: all atomic, the state last."""
        checkpoints = self.run_dir / "checkpoints"
        checkpoints.mkdir(parents=True, exist_ok=True)
        value = row[self.cfg.monitor.replace("/", "_")]
        averaging = averaged_rounds(self.cfg.federated) > 0
        if self.is_better(value):
            self.best = (round_number, value)
            if not averaging:
                save_global(
                    checkpoints / "best.ckpt", self.server.global_state, self.hparams, round_number
                )
        if averaging:
            self.accumulate_average(round_number)
            if round_number == self.cfg.federated.rounds:
                averaged = self.averaged_state()
                save_global(checkpoints / "best.ckpt", averaged, self.hparams, round_number)
        save_global(checkpoints / "last.ckpt", self.server.global_state, self.hparams, round_number)
        save_round_state(
            checkpoints,
            {
                "round": round_number,
                "server": self.server.state_dict(),
                "clients": self.cohort.state_dict(),
                "history": self.history,
                "best": list(self.best),
                "average_sum": self.average_sum,
                "elapsed_s": row["elapsed_s"],
                "fingerprint": self.fingerprint,
            },
        )

    def selection_rule(self) -> str:
        """How best.ckpt was chosen, in words, for summary.json and the reports."""
        fed = self.cfg.federated
        if averaged_rounds(fed) > 0:
            first = fed.rounds - averaged_rounds(fed) + 1
            return f"mean of the global models of rounds {first}-{fed.rounds}"
        return f"the round with the best {self.cfg.monitor}"

    def accumulate_average(self, round_number: int) -> None:
        """Add this round's global model to the average if it is one of the last K."""
        fed = self.cfg.federated
        if round_number <= fed.rounds - averaged_rounds(fed):
            return
        state = self.server.global_state
        if self.average_sum is None:
            self.average_sum = {k: v.double().clone() for k, v in state.items()}
        else:
            for k, v in state.items():
                self.average_sum[k] += v.double()

    def averaged_state(self) -> dict[str, torch.Tensor]:
        """The mean of the last K rounds' global models; integer buffers from the last round
        (FedAvg's own rule for them)."""
        k = averaged_rounds(self.cfg.federated)
        last = self.server.global_state
        return {
            name: (self.average_sum[name] / k).to(v.dtype) if v.is_floating_point() else v
            for name, v in last.items()
        }

    def run(self, tensorboard) -> None:
        """Every round not yet completed."""
        fed = self.cfg.federated
        started = time.time()
        for r in range(self.next_round, fed.rounds):
            round_started = time.time()
            try:
                updates, failures = self.train_clients(r)
            except (KeyboardInterrupt, SystemExit):  # Lightning turns Ctrl-C into exit(1)
                print(
                    f"round {r + 1} interrupted; rounds 1-{r} are saved: continue with "
                    f"python -m pneumonia.fit --resume {self.run_dir}",
                    file=sys.stderr,
                )
                raise
            excluded = self.server.aggregate(r, updates, failures)
            evaluations = self.evaluate()
            now = time.time()
            row = round_row(
                r + 1,
                len(self.cohort),
                updates,
                excluded,
                evaluations,
                now - round_started,
                self.elapsed_before + now - started,
            )
            self.history.append(row)
            self.checkpoint(r + 1, row)
            write_csv(self.run_dir / "rounds.csv", self.history)
            log_round(tensorboard, row)
            print(progress_line(row, fed.rounds, self.best, self.cfg.monitor), flush=True)
            if self.progress is not None:
                self.progress(r + 1, fed.rounds)


def run_federated(
    run: FederatedRun, run_dir: Path, resume: bool, progress: Progress | None = None
) -> TensorBoardLogger:
    """Train (or continue) `run` in `run_dir`; its TensorBoard events go there too.
    `progress(done, total)` hears of every completed round."""
    run.progress = progress
    # Each client's fit would announce "max_epochs reached": one line per client per round.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    run.attach(run_dir)
    state = load_round_state(run_dir) if resume else None
    if resume and state is None:
        raise UserError(f"{run_dir} has no completed round to resume from: start a new run")
    if state is not None:
        run.resume(state)
        print(f"resuming {run_dir} after round {run.next_round}/{run.cfg.federated.rounds}")
    table = format_table(run.table)
    print(f"clients ({run.cfg.federated.partition} partition):\n{table}", flush=True)
    write_csv(run_dir / "partition.csv", run.table)
    logger = TensorBoardLogger(run_dir, name="", version="", default_hp_metric=False)
    logger.experiment.add_text("partition", table, 0)
    run.run(logger.experiment)
    return logger
