"""Federated training (the paper's Algorithms 1 and 2): the mirror image of
`pneumonia.run.centralized`. This module owns the round loop: sample, train the clients (a
cohort: simulated in this process, or SuperNodes over Flower), aggregate (server, strategies),
evaluate the global model (scoring), stop early. What the rounds leave (rounds.csv, the
checkpoints, the round state) is `pneumonia.run.rounds`'s; what each round shows,
`pneumonia.run.monitor`'s; what the run reports of its federation,
`pneumonia.run.federated_report`'s."""

from __future__ import annotations

import logging
import time

from pneumonia.federated.aggregate import UpdateChecks
from pneumonia.federated.cohort import Cohort, RoundTask
from pneumonia.federated.options import clients_per_round, round_lr_scale
from pneumonia.federated.server import Server
from pneumonia.federated.strategies import Strategy, create_strategy, with_server_dp
from pneumonia.inference.scoring import evaluate_sets
from pneumonia.run.config import trainer_arguments, uses_cuda
from pneumonia.run.federated_report import announce, federated_record, privacy_record
from pneumonia.run.inputs import RunInputs, Trained
from pneumonia.run.monitor import log_round, progress_line, round_row, server_privacy, traffic
from pneumonia.run.rounds import RoundRecord
from pneumonia.run.rundir import best_checkpoint, client_logs, resume_hint, tensorboard_logger
from pneumonia.run.selection import monitor_column, selection_rule
from pneumonia.run.sites import site_names_record
from pneumonia.run.stopping import early_stopping_record, should_stop, stop_message
from pneumonia.training.module import ClassifierModule
from pneumonia.training.recipe import build_module

log = logging.getLogger(__name__)


class FederatedTraining:
    """One federated run in its run directory: the global model, the server, the clients and
    the record of the rounds done so far (restored from the run directory when resuming)."""

    def __init__(self, run: RunInputs, cohort: Cohort) -> None:
        self.cfg, self.splits, self.run_dir = run.cfg, run.splits, run.run_dir
        self.progress, self.cohort = run.progress, cohort
        fingerprint = cohort.fingerprint()  # which images: a resume must see the same
        # The global model first: its initialisation is the run's (the seed's) initialisation.
        self.module = build_module(run.recipe)
        self.strategy, self.server = build_server(run, cohort, self.module)
        self.device = "cuda" if uses_cuda(trainer_arguments(run.cfg)) else "cpu"
        self.rounds = RoundRecord(run.cfg, run.recipe, run.run_dir, fingerprint)
        self.stopped_after: int | None = None  # early stopping's last round
        cohort.start(run.recipe, client_logs(run.run_dir))
        if run.resume:
            self.rounds.restore(self.server, cohort)
        self.tensorboard = tensorboard_logger(run.run_dir)

    def round_task(self, round_index: int) -> RoundTask:
        fed = self.cfg.federated
        lr = self.cfg.optim.lr * round_lr_scale(
            fed.round_lr, round_index, fed.rounds, self.cfg.optim.decay
        )
        return RoundTask(self.server.global_state, round_index, fed.local_epochs, lr)

    def train_and_aggregate(self, round_index: int) -> tuple[list, list[int]]:
        """The round's client updates (for rounds.csv) and the clients left out, the global
        state aggregated; failures are noted, not raised. Under federated.secure_aggregation
        the cohort (a FlowerCohort: the run job refuses others) returns the clients' clear-text
        metadata (empty state dicts) and only the weighted average of their states, which the
        server checks and applies."""
        fed = self.cfg.federated
        chosen, task = self.server.sample_clients(), self.round_task(round_index)
        if not fed.secure_aggregation:
            updates, failures = self.cohort.train_round(chosen, task)
            return updates, self.server.aggregate(round_index, updates, failures)
        # Only a FlowerCohort has it (the Cohort protocol does not): preflight refuses others
        result = self.cohort.secure_train_round(  # type: ignore[attr-defined]
            chosen, task, fed.max_update_norm
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

    def train(self) -> None:
        """Every round not yet completed, until early stopping ends the run."""
        announce(self.cfg.federated, self.cohort, self.tensorboard.experiment, self.run_dir)
        started = time.time()
        if self.rounds.history and should_stop(self.cfg, self.rounds.history):
            # Resumed after it had stopped early (killed in the steps after training): it
            # stops there again instead of training the round it had stopped before.
            self.stop_after(len(self.rounds.history))
            return
        for r in range(self.rounds.next_round, self.cfg.federated.rounds):
            self.round(r, started)
            if should_stop(self.cfg, self.rounds.history):
                self.stop_after(r + 1)
                break

    def stop_after(self, rounds_done: int) -> None:
        self.stopped_after = rounds_done
        log.info(stop_message(self.cfg, rounds_done))

    def round(self, r: int, started: float) -> None:
        """Round r + 1: train, aggregate, evaluate, save, report."""
        rounds = self.cfg.federated.rounds
        round_started = time.time()
        updates, excluded = self.train_and_aggregate(r)
        evaluations = self.evaluate()
        now = time.time()
        row = round_row(
            r + 1,
            n_clients=len(self.cohort),
            updates=updates,
            excluded=excluded,
            evaluations=evaluations,
            round_s=now - round_started,
            elapsed_s=self.rounds.elapsed_before + now - started,
            extra=server_privacy(self.strategy)
            | traffic(self.server.global_state, updates, excluded),
        )
        self.rounds.add(row, self.server, self.cohort)
        log_round(self.tensorboard.experiment, row)
        log.info(progress_line(row, rounds, self.rounds.best, self.cfg.monitor))
        if self.progress is not None:
            self.progress(r + 1, rounds)


def build_server(
    run: RunInputs, cohort: Cohort, module: ClassifierModule
) -> tuple[Strategy, Server]:
    """The strategy (server_dp around it where set) and the server, from the global model."""
    cfg, fed = run.cfg, run.cfg.federated
    per_round = clients_per_round(fed.fraction, len(cohort))
    strategy = with_server_dp(create_strategy(fed, module), fed, per_round, len(cohort), cfg.seed)
    checks = UpdateChecks(
        declared={row["client"]: row["images"] for row in cohort.table},
        norm_ratio=fed.update_norm_ratio,
        max_norm=fed.max_update_norm,
    )
    hint = resume_hint(run.run_dir, deployed=run.deployed)
    server = Server(
        module.state_dict(),
        strategy,
        n_clients=len(cohort),
        per_round=per_round,
        min_clients=fed.min_clients,
        seed=cfg.seed,
        checks=checks,
        resume=hint,
    )
    return strategy, server


def train_federated(run: RunInputs, cohort: Cohort) -> Trained:
    """Train (or continue) a federation of `cohort`'s clients from the recipe in the run
    directory; the progress hook hears of every completed round."""
    # Each client's fit would announce "max_epochs reached": one line per client per round.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    training = FederatedTraining(run, cohort)
    training.train()
    cfg, rows = run.cfg, training.rounds.history
    record = federated_record(cfg.federated, cohort, rows)
    if names := site_names_record(cohort):
        record["federated"]["site_names"] = names
    return Trained(
        unit="round",
        checkpoint=best_checkpoint(run.run_dir),
        selected_by=selection_rule(cfg, "round"),
        logger=training.tensorboard,
        # Centrally, Lightning logs the module's hyper-parameters; here, the run's config.
        hparams_metrics={f"hparams/best_{monitor_column(cfg.monitor)}": training.rounds.best.value},
        details=record
        | early_stopping_record(cfg, "round", training.stopped_after)
        | privacy_record(cfg, training.strategy, rows, len(cohort)),
    )
