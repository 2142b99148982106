"""Early stopping, one rule for epochs and rounds (early_stopping.patience > 0): Lightning's
EarlyStopping stops a centralized run by epoch; the same rule, recomputed from rounds.csv's
rows, stops a federated run by round, so a resumed run stops where it would have. Both
record it alike in summary.json (`early_stopping_record`)."""

from __future__ import annotations

import math

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.callbacks import Callback, EarlyStopping

from pneumonia.run.config import monitor_mode
from pneumonia.run.selection import monitor_column


class ResumableEarlyStopping(EarlyStopping):
    """Lightning's EarlyStopping, except that a run resumed after it had stopped (killed in
    the steps after training) stops again at once: Lightning restores the callback's counts
    but not `trainer.should_stop`, and would train one more epoch."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.stopped_epoch:  # 0: never stopped
            trainer.should_stop = True


def early_stopping(cfg: Namespace) -> list[Callback]:
    """Lightning's EarlyStopping on the run's monitor (early_stopping.patience > 0)."""
    rule = cfg.early_stopping
    if rule.patience == 0:
        return []
    return [
        ResumableEarlyStopping(
            cfg.monitor,
            min_delta=rule.min_delta,
            patience=rule.patience,
            mode=monitor_mode(cfg.monitor),
        )
    ]


def stopped_epoch(trainer: L.Trainer) -> int | None:
    """The epoch (from 1) Lightning's EarlyStopping stopped after, or None."""
    stopper = trainer.early_stopping_callback
    # Lightning's stopped_epoch counts from 0; 0 also means "never stopped".
    return stopper.stopped_epoch + 1 if stopper is not None and stopper.stopped_epoch else None


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


def should_stop(cfg: Namespace, rows: list[dict]) -> bool:
    """Whether the rounds of `rows` (rounds.csv's) end a federated run early."""
    rule = cfg.early_stopping
    if rule.patience == 0:
        return False
    values = [row[monitor_column(cfg.monitor)] for row in rows]
    stale = rounds_without_improvement(values, monitor_mode(cfg.monitor), rule.min_delta)
    return stale >= rule.patience


def stop_message(cfg: Namespace, rounds_done: int) -> str:
    rule = cfg.early_stopping
    return (
        f"early stopping after round {rounds_done}: {cfg.monitor} has not improved "
        f"by more than {rule.min_delta:g} for {rule.patience} rounds"
    )


def early_stopping_record(cfg: Namespace, unit: str, stopped_after: int | None) -> dict:
    """summary.json's `early_stopping` (absent when it is off); `unit`: "epoch" or "round",
    `stopped_after`: the last one trained when it stopped, None when it never did."""
    rule = cfg.early_stopping
    if rule.patience == 0:
        return {}
    return {
        "early_stopping": {
            "monitor": cfg.monitor,
            "patience": rule.patience,
            "min_delta": rule.min_delta,
            "unit": unit,
            "stopped_after": stopped_after,
        }
    }
