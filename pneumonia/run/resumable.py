"""What makes a centralized run resume exactly, as the federated round checkpoint does: the
random state travels in every checkpoint, and metrics.csv keeps the rows of every epoch the
checkpoint holds (Lightning's CSV writer deletes the file when a run continues), flushed
before each next epoch so that even a kill no handler sees (SIGKILL) loses none of them.
A signal stops training between batches (`StopBetweenBatches`), never between an epoch's
checkpoint and the metrics rows Lightning logs after it."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from pneumonia.core.files import write_text_atomic
from pneumonia.core.interrupt import check, received, record_signals
from pneumonia.federated.state import rng_state, set_rng_state


class RandomState(Callback):
    """Keeps the random state (augmentation, dropout, batch order) in every checkpoint and
    restores it on --resume, so that a resumed run draws what the uninterrupted one drew and
    ends with the same weights (the federated round checkpoint does the same)."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def state_dict(self) -> dict:
        return {"process": rng_state(), "loader": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(state["process"])
        self.generator.set_state(state["loader"])


class HistoryWriter(ExperimentWriter):
    """Lightning's CSV writer, except that it never deletes metrics.csv: on --resume it keeps
    the rows of the `epochs` the checkpoint holds (Lightning's writer deletes the file, and
    with it the history of the epochs before the interruption)."""

    def __init__(self, log_dir: str, epochs: int) -> None:
        self.epochs = epochs
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with path.open(newline="") as file:
            reader = csv.DictReader(file)
            rows = [row for row in reader if int(row["epoch"] or 0) < self.epochs]
            self.metrics_keys = sorted(reader.fieldnames or [])
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=self.metrics_keys, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(path, out.getvalue())


class HistoryCSVLogger(CSVLogger):
    """The CSV logger of a run that may be resumed after `epochs` completed epochs."""

    _experiment: HistoryWriter | None  # only `experiment` below sets it

    def __init__(self, run_dir: Path, epochs: int) -> None:
        super().__init__(run_dir, name="", version="")
        self.epochs = epochs

    @property
    @rank_zero_experiment  # the copies of a run on several devices write no rows
    def experiment(self) -> HistoryWriter:
        if self._experiment is None:
            self._experiment = HistoryWriter(self.log_dir, self.epochs)
        return self._experiment


class FlushEachEpoch(Callback):
    """Writes the CSV rows of each epoch before the next starts, so that metrics.csv holds
    every epoch that last.ckpt holds even after a kill no handler sees (SIGKILL)."""

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                logger.save()


class StopBetweenBatches(Callback):
    """Where a signal deferred during `trainer.fit` (pneumonia.core.interrupt.deferred) stops the
    run: after a batch, or before an epoch, when everything written so far is consistent."""

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.world_size > 1:  # Lightning installed its handlers just before
            record_signals()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.check(trainer)

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, *rest) -> None:
        self.check(trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.check(trainer)

    @staticmethod
    def check(trainer: L.Trainer) -> None:
        """Stop here if a signal arrived. On several devices every process stops at the same
        batch when any one received it (`kill` reaches process 0 only): a process that stopped
        alone would leave the others waiting for it in the next gradient exchange."""
        if trainer.world_size == 1:
            check()
        elif trainer.strategy.reduce_boolean_decision(received() is not None, all=False):
            raise KeyboardInterrupt
