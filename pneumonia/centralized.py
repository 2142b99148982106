"""Centralized training: one Lightning Trainer over all training images (the baselines)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.callbacks import (
    Callback,
    EMAWeightAveraging,
    ModelCheckpoint,
    WeightAveraging,
)
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from pneumonia.data.datamodule import ChestXrayDataModule, class_balanced_weights
from pneumonia.data.sources import Splits
from pneumonia.errors import UserError
from pneumonia.module import ClassifierModule
from pneumonia.seeding import seed_training
from pneumonia.summary import best_checkpoint_metrics

# Called with (done, total) after each epoch or round, e.g. by a comparison's progress display.
Progress = Callable[[int, int], None]


class ReportEpochs(Callback):
    """Tells a `Progress` how many epochs are done, after each epoch's validation."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.progress(trainer.current_epoch + 1, trainer.max_epochs)


class EpochAveraging(WeightAveraging):
    """SWA: the equal average of the weights at the end of each epoch from `start` on."""

    def __init__(self, start: int) -> None:
        super().__init__()
        self.start = start

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return epoch_idx is not None and epoch_idx >= self.start


def weight_averaging(optim, max_epochs: int) -> list[Callback]:
    """The callback of `optim.weight_averaging`: Lightning's own (it validates and saves the
    averaged weights; the checkpoint keeps the raw ones as current_model_state)."""
    if optim.weight_averaging == "ema":
        return [EMAWeightAveraging(decay=optim.ema_decay)]
    if optim.weight_averaging == "swa":
        return [EpochAveraging(int(optim.swa_start * max_epochs))]
    return []


def build_module(cfg: Namespace, splits: Splits) -> ClassifierModule:
    """The LightningModule the config describes, normalised with the training images' stats."""
    mean, std = splits.train.pixel_mean_std()
    weights = (
        class_balanced_weights(splits.train.labels, len(splits.train.classes))
        if cfg.data.balance == "loss_weights"
        else None
    )
    return ClassifierModule(
        model=asdict(cfg.model),
        optim=asdict(cfg.optim),
        image_size=cfg.data.image_size,
        classes=splits.train.classes,
        positive_class=cfg.positive_class,
        class_weights=weights,
        mean=round(mean, 4),
        std=round(std, 4),
    )


def build_datamodule(cfg: Namespace, splits: Splits) -> ChestXrayDataModule:
    d = cfg.data
    return ChestXrayDataModule(
        splits.train,
        splits.val,
        splits.test,
        batch_size=d.batch_size,
        eval_batch_size=d.eval_batch_size,
        balanced_sampling=d.balance == "sampler",
        augment=d.augment,
        seed=cfg.seed,
        val_shift=splits.val_shift,
        num_workers=d.num_workers,
    )


def build_trainer(
    cfg: Namespace, run_dir: Path, trainer_args: dict, progress: Progress | None = None
) -> tuple[L.Trainer, ModelCheckpoint]:
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor=cfg.monitor,
        mode="min" if cfg.monitor.endswith("loss") else "max",
        auto_insert_metric_name=False,
    )
    # Its own callback: Lightning 2.6's save_last writes last.ckpt only in epochs that also
    # improve best.ckpt, so last.ckpt could be epochs old.
    last = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="last", monitor=None)
    loggers = [
        TensorBoardLogger(run_dir, name="", version="", default_hp_metric=False),
        CSVLogger(run_dir, name="", version=""),
    ]
    callbacks = [checkpoint, last] + ([ReportEpochs(progress)] if progress else [])
    callbacks += weight_averaging(cfg.optim, int(trainer_args.get("max_epochs") or 1))
    trainer = L.Trainer(
        **trainer_args, logger=loggers, callbacks=callbacks, default_root_dir=run_dir
    )
    return trainer, checkpoint


def train_centralized(
    cfg: Namespace,
    splits: Splits,
    run_dir: Path,
    trainer_args: dict,
    resume: bool,
    progress: Progress | None = None,
) -> dict:
    """Fit, then evaluate the best checkpoint; the summary's training part."""
    module = build_module(cfg, splits)
    datamodule = build_datamodule(cfg, splits)
    trainer, checkpoint = build_trainer(cfg, run_dir, trainer_args, progress)
    last = run_dir / "checkpoints" / "last.ckpt"
    if resume and not last.is_file():
        raise UserError(f"{run_dir} has no checkpoints/last.ckpt to resume from: start a new run")
    # The same seed a single federated client trains round 1 with: see pneumonia.seeding.
    seed_training(datamodule.generator, cfg.seed)
    trainer.fit(module, datamodule, ckpt_path=last if resume else None)
    best, results = best_checkpoint_metrics(
        module,
        checkpoint.best_model_path or run_dir / "checkpoints" / "last.ckpt",
        splits,
        trainer.loggers[0].experiment,
        cfg.data.eval_batch_size,
        cfg.threshold,
        run_dir / "predictions.csv",
    )
    return {
        "epochs": trainer.current_epoch,
        "best_epoch": int(best["epoch"]),
        "selected_by": selection_rule(cfg),
        **results,
    }


def selection_rule(cfg: Namespace) -> str:
    """How best.ckpt was chosen, in words, for summary.json and the reports."""
    averaged = {"ema": "EMA weights", "swa": "SWA weights", "none": "weights"}
    return f"the epoch whose {averaged[cfg.optim.weight_averaging]} had the best {cfg.monitor}"
