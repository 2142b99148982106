"""Federated training (the paper's Algorithms 1 and 2): the mirror image of
`pneumonia.run.centralized`. It calls the stages, it holds none: the clients (a cohort:
simulated in this process, or SuperNodes over Flower), aggregation (server, strategies),
evaluation (scoring), the round checkpoint (state) and what the run shows (monitor)."""

from __future__ import annotations

import logging
import math
import time

import torch
from lightning.pytorch.loggers import TensorBoardLogger

from pneumonia.core.errors import UserError
from pneumonia.core.files import write_csv
from pneumonia.data.partition import format_table
from pneumonia.data.sites import profile_rows, site_profiles
from pneumonia.federated.aggregate import UpdateChecks
from pneumonia.federated.cohort import Cohort, RoundTask
from pneumonia.federated.options import (
    averaged_rounds,
    clients_per_round,
    round_lr_scale,
    shifts_sites,
)
from pneumonia.federated.server import Server
from pneumonia.federated.state import load_round_state, save_round_state, set_rng_state
from pneumonia.federated.strategies import ServerDP, create_strategy, with_server_dp
from pneumonia.inference.scoring import evaluate_sets
from pneumonia.run.config import monitor_mode, trainer_arguments, uses_cuda
from pneumonia.run.finalize import Trained
from pneumonia.run.inputs import RunInputs
from pneumonia.run.monitor import Best, log_round, progress_line, round_row
from pneumonia.run.rundir import resume_hint
from pneumonia.training.checkpoint import write_checkpoint
from pneumonia.training.recipe import build_module


class FederatedTraining:
    """One federated run in its run directory: the global model, the server, the clients and
    the rounds done so far (restored from the run directory when resuming)."""

    def __init__(self, run: RunInputs, cohort: Cohort) -> None:
        cfg, recipe, fed = run.cfg, run.recipe, run.cfg.federated
        self.cfg, self.recipe, self.splits, self.run_dir = cfg, recipe, run.splits, run.run_dir
        self.progress, self.cohort = run.progress, cohort
        self.fingerprint = cohort.fingerprint()  # which images: a resume must see the same
        # The global model first: its initialisation is the run's (the seed's) initialisation.
        self.module = build_module(recipe)
        per_round = clients_per_round(fed.fraction, len(cohort))
        self.strategy = with_server_dp(
            create_strategy(fed, self.module), fed, per_round, len(cohort), cfg.seed
        )
        self.server = Server(
            self.module.state_dict(),
            self.strategy,
            len(cohort),
            per_round,
            fed.min_clients,
            cfg.seed,
            UpdateChecks(
                declared={row["client"]: row["images"] for row in cohort.table},
                norm_ratio=fed.update_norm_ratio,
                max_norm=fed.max_update_norm,
            ),
            resume_hint(run.run_dir, deployed=run.deployed),
        )
        self.device = "cuda" if uses_cuda(trainer_arguments(cfg)) else "cpu"
        self.history: list[dict] = []
        self.best = Best(0, float("nan"))
        # Sum of the global states of the rounds averaged so far (federated.average_rounds).
        self.average_sum: dict[str, torch.Tensor] | None = None
        self.next_round = 0
        self.stopped_after: int | None = None  # early stopping's last round
        self.elapsed_before = 0.0
        cohort.start(recipe, run.run_dir / "clients")
        if run.resume:
            self.restore()
        self.tensorboard = TensorBoardLogger(
            run.run_dir, name="", version="", default_hp_metric=False
        )

    def restore(self) -> None:
        """Continue after the last completed round saved in the run directory."""
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
        self.server.load_state_dict(state["server"])
        self.cohort.load_state_dict(state["clients"])
        self.history, self.best = list(state["history"]), Best(*state["best"])
        self.average_sum = state.get("average_sum")
        self.next_round, self.elapsed_before = int(state["round"]), float(state["elapsed_s"])
        set_rng_state(state["rng"])
        rounds = self.cfg.federated.rounds
        print(f"resuming {self.run_dir} after round {self.next_round}/{rounds}", flush=True)

    def round_task(self, round_index: int) -> RoundTask:
        fed = self.cfg.federated
        lr = self.cfg.optim.lr * round_lr_scale(
            fed.round_lr, round_index, fed.rounds, self.cfg.optim.decay
        )
        return RoundTask(self.server.global_state, round_index, fed.local_epochs, lr)

    def train_clients(self, round_index: int) -> tuple[list, dict[int, str]]:
        """The sampled clients train from the global state; failures are noted, not raised."""
        return self.cohort.train_round(self.server.sample_clients(), self.round_task(round_index))

    def train_and_aggregate(self, round_index: int) -> tuple[list, list[int]]:
        """The round's client updates (for rounds.csv) and the clients left out, the global
        state aggregated. Under federated.secure_aggregation the cohort (a FlowerCohort: the
        run job refuses others) returns the clients' clear-text metadata (empty state dicts)
        and only the weighted average of their states, which the server checks and applies."""
        fed = self.cfg.federated
        if not fed.secure_aggregation:
            updates, failures = self.train_clients(round_index)
            return updates, self.server.aggregate(round_index, updates, failures)
        result = self.cohort.secure_train_round(  # type: ignore[attr-defined]
            self.server.sample_clients(), self.round_task(round_index), fed.max_update_norm
        )
        return result.updates, self.server.aggregate_secure(round_index, result)

    def evaluate(self) -> dict[str, dict]:
        """Global model metrics on the validation (and test) images after a round."""
        self.module.load_state_dict(self.server.global_state)
        bs = self.cfg.data.eval_batch_size
        sets = self.splits.evaluation_sets()
        out = evaluate_sets(self.module, sets, bs, self.device, self.splits.val_site)
        self.module.cpu()
        return out

    def is_better(self, value: float) -> bool:
        if self.best.step == 0:
            return True
        lower = monitor_mode(self.cfg.monitor) == "min"
        return value < self.best.value if lower else value > self.best.value

    def checkpoint(self, round_number: int, row: dict) -> None:
        """best.ckpt, last.ckpt, then the resume state: all atomic, the state last."""
        checkpoints = self.run_dir / "checkpoints"
        checkpoints.mkdir(parents=True, exist_ok=True)
        value = row[self.cfg.monitor.replace("/", "_")]
        averaging = averaged_rounds(self.cfg.federated) > 0
        state = self.server.global_state
        if self.is_better(value):
            self.best = Best(round_number, value)
            if not averaging:
                write_checkpoint(checkpoints / "best.ckpt", state, self.recipe, round_number)
        if averaging:
            self.accumulate_average(round_number)
            if round_number == self.cfg.federated.rounds:
                averaged = self.averaged_state()
                write_checkpoint(checkpoints / "best.ckpt", averaged, self.recipe, round_number)
        write_checkpoint(checkpoints / "last.ckpt", state, self.recipe, round_number)
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

    def traffic(self, updates, excluded) -> dict:
        """MB of model state sent this round: the global state to each sampled client and
        each update back (full float state dicts, as this loop and the Flower wire copy them;
        secure aggregation's masking and key shares are not counted)."""
        state_bytes = sum(t.numel() * t.element_size() for t in self.server.global_state.values())
        sampled = len({u.client for u in updates} | set(excluded))
        return {"mb_sent": round(state_bytes * (sampled + len(updates)) / 1e6, 3)}

    def server_privacy(self) -> dict:
        """server_dp's epsilon so far, as a rounds.csv column (none without server DP)."""
        if not isinstance(self.strategy, ServerDP):
            return {}
        return {"server_epsilon": round(self.strategy.epsilon(), 4)}

    def privacy_details(self) -> dict:
        """summary.json's `privacy`: each client's final (epsilon, delta) under DP-SGD, the
        server's under server_dp; absent for a run without differential privacy."""
        out: dict = {}
        cfg = self.cfg
        if cfg.privacy.enabled:
            last: dict[str, float] = {}
            for row in self.history:  # a client's epsilon as of the last round it trained
                for j in range(len(self.cohort)):
                    if row.get(f"client{j}_epsilon", "") != "":
                        last[str(j)] = row[f"client{j}_epsilon"]
            p = cfg.privacy
            out["clients"] = {
                "mechanism": "DP-SGD (Opacus), per client",
                "epsilon": max(last.values(), default=0.0),
                "epsilon_per_client": last,
                "delta": p.delta,
                "accountant": p.accountant,
                "max_grad_norm": p.max_grad_norm,
                "noise": f"noise_multiplier {p.noise_multiplier}"
                if p.noise_multiplier is not None
                else f"calibrated per client for target_epsilon {p.target_epsilon}",
            }
        if isinstance(self.strategy, ServerDP):
            s = cfg.federated.server_dp
            out["server"] = {
                "mechanism": "user-level DP-FedAvg on the server",
                "epsilon": round(self.strategy.epsilon(), 4),
                "delta": s.delta,
                "noise_multiplier": s.noise_multiplier,
                "clip_norm": s.clip_norm,
            }
        return out

    def train(self) -> None:
        """Every round not yet completed."""
        table = format_table(self.cohort.table)
        print(f"clients ({self.cfg.federated.partition} partition):\n{table}", flush=True)
        if shifts_sites(self.cfg.federated):
            profiles = site_profiles(len(self.cohort.site_table), self.cfg.federated.site_seed)
            lines = "\n".join(f"  site {j}: {p.describe()}" for j, p in enumerate(profiles))
            print(f"site acquisition profiles:\n{lines}", flush=True)
            self.tensorboard.experiment.add_text("site_profiles", lines, 0)
        write_csv(self.run_dir / "partition.csv", self.cohort.table)
        self.tensorboard.experiment.add_text("partition", table, 0)
        started = time.time()
        if self.history and self.should_stop():
            # Resumed after it had stopped early (killed in the steps after training): it
            # stops there again instead of training the round it had stopped before.
            self.stop_after(len(self.history))
            return
        for r in range(self.next_round, self.cfg.federated.rounds):
            self.round(r, started)
            if self.should_stop():
                self.stop_after(r + 1)
                break

    def stop_after(self, rounds_done: int) -> None:
        self.stopped_after = rounds_done
        rule = self.cfg.early_stopping
        print(
            f"early stopping after round {rounds_done}: {self.cfg.monitor} has not improved "
            f"by more than {rule.min_delta:g} for {rule.patience} rounds",
            flush=True,
        )

    def should_stop(self) -> bool:
        """Early stopping by round: the rule Lightning's EarlyStopping applies to epochs,
        recomputed from the rounds' history (so a resumed run stops where it would have)."""
        rule = self.cfg.early_stopping
        if rule.patience == 0:
            return False
        values = [row[self.cfg.monitor.replace("/", "_")] for row in self.history]
        stale = rounds_without_improvement(values, monitor_mode(self.cfg.monitor), rule.min_delta)
        return stale >= rule.patience

    def stopping_details(self) -> dict:
        """summary.json's early_stopping record (absent when it is off)."""
        rule = self.cfg.early_stopping
        if rule.patience == 0:
            return {}
        return {
            "early_stopping": {
                "monitor": self.cfg.monitor,
                "patience": rule.patience,
                "min_delta": rule.min_delta,
                "unit": "round",
                "stopped_after": self.stopped_after,
            }
        }

    def round(self, r: int, started: float) -> None:
        """Round r + 1: train, aggregate, evaluate, checkpoint, report."""
        fed = self.cfg.federated
        round_started = time.time()
        updates, excluded = self.train_and_aggregate(r)
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
            self.server_privacy() | self.traffic(updates, excluded),
        )
        self.history.append(row)
        # rounds.csv before the resume state: a kill between them leaves a row the next
        # round rewrites, never a saved round without its row.
        write_csv(self.run_dir / "rounds.csv", self.history)
        self.checkpoint(r + 1, row)
        log_round(self.tensorboard.experiment, row)
        print(progress_line(row, fed.rounds, self.best, self.cfg.monitor), flush=True)
        if self.progress is not None:
            self.progress(r + 1, fed.rounds)


def rounds_without_improvement(values: list[float], mode: str, min_delta: float) -> int:
    """How many of the last values failed to improve on the best before them by more than
    `min_delta` (mode "min": lower is better), as Lightning's EarlyStopping counts; a
    non-finite value never improves."""
    best, stale = None, 0
    for value in values:
        gain = None if best is None else (best - value if mode == "min" else value - best)
        if math.isfinite(value) and (best is None or gain > min_delta):
            best, stale = value, 0
        else:
            stale += 1
    return stale


def site_details(fed, cohort: Cohort) -> dict:
    """summary.json's account of reshaped sites: profiles, the held-out site, pooling."""
    out: dict = {}
    if shifts_sites(fed):
        profiles = site_profiles(len(cohort.site_table), fed.site_seed)
        out["site_profiles"] = profile_rows(profiles)
    if fed.hold_out is not None:
        out["hold_out"] = fed.hold_out
    if fed.pooled:
        out["pooled"] = True
    if out:
        out["site_table"] = cohort.site_table
    return out


def train_federated(run: RunInputs, cohort: Cohort) -> Trained:
    """Train (or continue) a federation of `cohort`'s clients from the recipe in the run
    directory; the progress hook hears of every completed round."""
    # Each client's fit would announce "max_epochs reached": one line per client per round.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    training = FederatedTraining(run, cohort)
    training.train()
    cfg, fed = run.cfg, run.cfg.federated
    return Trained(
        unit="round",
        checkpoint=run.run_dir / "checkpoints" / "best.ckpt",
        selected_by=training.selection_rule(),
        logger=training.tensorboard,
        # Centrally, Lightning logs the module's hyper-parameters; here, the run's config.
        hparams_metrics={f"hparams/best_{cfg.monitor.replace('/', '_')}": training.best.value},
        details={
            "federated": {
                "strategy": fed.strategy,
                "partition": fed.partition,
                "clients": len(cohort),
                "rounds": len(training.history),
                "local_epochs": fed.local_epochs,
                "mb_sent": round(sum(row.get("mb_sent", 0) for row in training.history), 3),
                "partition_table": cohort.table,
            }
            | site_details(fed, cohort)
        }
        | training.stopping_details()
        | ({"privacy": privacy} if (privacy := training.privacy_details()) else {}),
    )
