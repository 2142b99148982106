"""Centralized training: one Lightning Trainer over all training images (the baselines); the
mirror image of `pneumonia.run.federated`."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import cast

import lightning as L
import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import (
    Callback,
    EMAWeightAveraging,
    ModelCheckpoint,
    WeightAveraging,
)
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from pneumonia.core.errors import UserError
from pneumonia.core.interrupt import deferred
from pneumonia.core.safeload import safe_load
from pneumonia.core.seeding import seed_training
from pneumonia.data.datamodule import ChestXrayDataModule
from pneumonia.data.sources import Splits
from pneumonia.run.config import monitor_mode, trainer_arguments
from pneumonia.run.inputs import RunInputs, Trained
from pneumonia.run.progress import Progress, duration
from pneumonia.run.resumable import (
    FlushEachEpoch,
    HistoryCSVLogger,
    RandomState,
    StopBetweenBatches,
)
from pneumonia.run.rundir import (
    BEST,
    CHECKPOINTS,
    LAST,
    checkpoints_dir,
    last_checkpoint,
    tensorboard_logger,
)
from pneumonia.run.selection import selection_rule
from pneumonia.run.stopping import early_stopping, early_stopping_record, stopped_epoch
from pneumonia.training.checkpoint import CheckpointIO
from pneumonia.training.module import ClassifierModule
from pneumonia.training.privacy import DPSGD, AccountantState, make_private, planned_steps
from pneumonia.training.recipe import build_module, loss_weights

log = logging.getLogger(__name__)


def _max_epochs(trainer: L.Trainer) -> int:
    """The fit's last epoch (from 1): Lightning's loop sets it when a fit starts."""
    epochs = trainer.max_epochs
    assert epochs is not None  # a callback runs inside a fit, which has set it
    return epochs


class ReportEpochs(Callback):
    """Tells a `Progress` how many epochs are done, after each epoch's validation."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.progress(trainer.current_epoch + 1, _max_epochs(trainer))


class EpochLines(Callback):
    """One line per epoch where no progress bar is drawn (a log, CI, a notebook's output): the
    federated run's round line, for epochs."""

    def __init__(self, checkpoint: ModelCheckpoint) -> None:
        self.checkpoint = checkpoint
        self.started = time.time()

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        done, total = trainer.current_epoch + 1, _max_epochs(trainer)
        elapsed = time.time() - self.started
        shift = (
            f" | shift acc {m['val_shift/accuracy']:.3f} auroc {m['val_shift/auroc']:.3f}"
            if "val_shift/accuracy" in m
            else ""
        )
        val = (
            f" | val acc {m['val/accuracy']:.3f} auroc {m['val/auroc']:.3f}{shift}"
            if "val/accuracy" in m
            else ""
        )
        best = self.checkpoint.best_model_score
        best_text = (
            f" | best {self.checkpoint.monitor} {float(best):.3f}" if best is not None else ""
        )
        left = duration(elapsed / done * (total - done))
        assert isinstance(module, ClassifierModule)  # the module train_centralized builds
        if module.privacy is not None:  # read now: the module logs it after this callback
            best_text += f" | epsilon {module.privacy.epsilon():.2f}"
        log.info(
            f"epoch {done:{len(str(total))}d}/{total}  train loss "
            f"{m.get('train/loss_epoch', float('nan')):.3f}{val}{best_text} | {left} left"
        )


class Divergence(Callback):
    """Stops the fit at the first training step whose loss is not finite (NaN or inf): the
    run is reported as diverged (summary.json `diverged`), not trained on in NaN."""

    def __init__(self) -> None:
        self.epoch: int | None = None  # the epoch (from 1) it diverged in

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not bool(torch.isfinite(loss).all()):
            self.epoch = trainer.current_epoch + 1
            trainer.should_stop = True


def stopping_details(cfg: Namespace, trainer: L.Trainer, divergence: Divergence) -> dict:
    """summary.json's record of how training ended: early stopping's rule and epoch, and
    whether the loss diverged."""
    out: dict = {}
    if divergence.epoch is not None:
        out |= {"diverged": True, "diverged_in_epoch": divergence.epoch}
    return out | early_stopping_record(cfg, "epoch", stopped_epoch(trainer))


class EpochAveraging(WeightAveraging):
    """SWA: the equal average of the weights at the end of each epoch from `start` on."""

    def __init__(self, start: int) -> None:
        super().__init__()
        self.start = start

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return epoch_idx is not None and epoch_idx >= self.start


# What Opacus's GradSampleHooks keep on a network's modules and parameters between a forward
# and an optimizer step besides the hooks themselves (opacus/grad_sample/grad_sample_module.py),
# and the sum its DPOptimizer leaves on each parameter.
_OPACUS_MODULE_STATE = ("activations", "max_batch_len", "ft_compute_sample_grad")
_OPACUS_PARAMETER_STATE = ("grad_sample", "_current_grad_sample", "_forward_counter", "summed_grad")


def strip_per_sample_hooks(copied: nn.Module) -> None:
    """Take out of a deep copy of a private module what Opacus added to it. The copy's hook
    handles point at the copy's own hook dicts (deepcopy copies them together), so removing
    them leaves the private module's hooks in place."""
    for module in copied.modules():
        for handle in module.__dict__.pop("autograd_grad_sample_hooks", []):
            handle.remove()
        for name in _OPACUS_MODULE_STATE:
            module.__dict__.pop(name, None)
    for parameter in copied.parameters():
        for name in _OPACUS_PARAMETER_STATE:
            parameter.__dict__.pop(name, None)


class HookFreeAveraging(WeightAveraging):
    """Weight averaging of a private run (privacy.enabled): Lightning's, except that the
    averaged copy is made without DP-SGD: no `privacy` (the run's one accountant stays with the
    trained module) and none of Opacus's per-sample hooks (the copy never runs a batch:
    Lightning swaps weights in and out of it). Averaging the weights DP-SGD produced is
    post-processing, so it spends no privacy."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        assert isinstance(pl_module, ClassifierModule)  # the module train_centralized builds
        privacy, pl_module.privacy = pl_module.privacy, None
        try:
            super().setup(trainer, pl_module, stage)  # deep-copies pl_module when a fit starts
        finally:
            pl_module.privacy = privacy
        if self._average_model is not None:
            strip_per_sample_hooks(self._average_model.module)


class PrivateEMA(HookFreeAveraging, EMAWeightAveraging):
    """`optim.weight_averaging ema` of a private run."""


class PrivateEpochAveraging(HookFreeAveraging, EpochAveraging):
    """`optim.weight_averaging swa` of a private run."""


def weight_averaging(optim, max_epochs: int, private: bool = False) -> list[Callback]:
    """The callback of `optim.weight_averaging`: Lightning's own (it validates and saves the
    averaged weights; the checkpoint keeps the raw ones as current_model_state), made from a
    copy without the per-sample hooks in a private run."""
    if optim.weight_averaging == "ema":
        ema = PrivateEMA if private else EMAWeightAveraging
        return [ema(decay=optim.ema_decay)]
    if optim.weight_averaging == "swa":
        swa = PrivateEpochAveraging if private else EpochAveraging
        return [swa(int(optim.swa_start * max_epochs))]
    return []


def build_datamodule(
    cfg: Namespace, splits: Splits, module: ClassifierModule | None = None
) -> ChestXrayDataModule:
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
        poisson=cfg.privacy.batches() if cfg.privacy.enabled else None,
        progressive=d.progressive,
        planned_epochs=int(cfg.trainer.max_epochs or 1),
        front=module.fixed_features if module is not None else None,
    )


def build_trainer(
    cfg: Namespace,
    run_dir: Path,
    progress: Progress | None = None,
    generator: torch.Generator | None = None,
    epochs_done: int = 0,
    extra: list[Callback] | None = None,
) -> tuple[L.Trainer, ModelCheckpoint]:
    """The run's Trainer: TensorBoard and CSV loggers, best and last checkpoints, weight
    averaging, and Lightning's progress bar on a terminal only (unless trainer.* says)."""
    trainer_args = trainer_arguments(cfg)
    if trainer_args.get("enable_progress_bar") is None:
        trainer_args["enable_progress_bar"] = sys.stdout.isatty()
    checkpoint = ModelCheckpoint(
        dirpath=checkpoints_dir(run_dir),
        filename=Path(BEST).stem,
        monitor=cfg.monitor,
        mode=monitor_mode(cfg.monitor),
        auto_insert_metric_name=False,
    )
    # Its own callback: Lightning 2.6's save_last writes last.ckpt only in epochs that also
    # improve best.ckpt, so last.ckpt could be epochs old.
    last = ModelCheckpoint(dirpath=checkpoints_dir(run_dir), filename=Path(LAST).stem, monitor=None)
    loggers = [tensorboard_logger(run_dir), HistoryCSVLogger(run_dir, epochs_done)]
    callbacks = [checkpoint, last, FlushEachEpoch(), StopBetweenBatches(), *(extra or [])]
    callbacks += [ReportEpochs(progress)] if progress else []
    if generator is not None:
        callbacks.append(RandomState(generator))
    if not trainer_args["enable_progress_bar"]:
        callbacks.append(EpochLines(checkpoint))
    epochs = int(trainer_args.get("max_epochs") or 1)
    callbacks += weight_averaging(cfg.optim, epochs, private=cfg.privacy.enabled)
    plugins = [*(trainer_args.pop("plugins", None) or []), CheckpointIO()]
    # On several devices the data module shards each batch itself (data.datamodule.RankShard):
    # Lightning's DistributedSampler would take our whole-batch sampler for one of images.
    trainer_args["use_distributed_sampler"] = False
    trainer = L.Trainer(
        **trainer_args,
        logger=loggers,
        callbacks=callbacks,
        default_root_dir=run_dir,
        plugins=plugins,
    )
    return trainer, checkpoint


def train_centralized(run: RunInputs) -> Trained:
    """Fit (or continue fitting) the recipe's module on the training images in the run
    directory; the progress hook hears of every completed epoch."""
    cfg, splits, run_dir, resume = run.cfg, run.splits, run.run_dir, run.resume
    module = build_module(run.recipe, loss_weights(cfg.data.balance, splits.train))
    module.figures_every = cfg.figures_every  # monitoring, not the recipe: not saved
    datamodule = build_datamodule(cfg, splits, module)
    private = private_training(cfg, module, len(splits.train))
    last = last_checkpoint(run_dir)
    if resume and not last.is_file():
        raise UserError(f"{run_dir} has no {CHECKPOINTS}/{LAST} to resume from: start a new run")
    # cast: a loaded file's contents (a checkpoint: a dict that holds its epoch).
    done = int(cast(dict, safe_load(last, mmap=True))["epoch"]) + 1 if resume else 0
    planned = int(cfg.trainer.max_epochs or 1)
    if done > planned:  # a longer resume interrupted, then resumed with the shorter config
        raise UserError(
            f"{run_dir} has trained {done} epochs, more than trainer.max_epochs {planned}: "
            f"resume with --trainer.max_epochs {done} or more"
        )
    divergence = Divergence()
    extra = [divergence, *early_stopping(cfg)]
    extra += [AccountantState(private)] if private is not None else []
    trainer, checkpoint = build_trainer(
        cfg, run_dir, run.progress, datamodule.generator, done, extra
    )
    # The same seed a single federated client trains round 1 with: see pneumonia.core.seeding.
    seed_training(datamodule.generator, cfg.seed)
    with deferred():  # a signal stops the fit between batches: see pneumonia.run.resumable
        trainer.fit(module, datamodule, ckpt_path=last if resume else None)
    if torch.distributed.is_initialized():  # the fit's processes are done: process 0 scores
        torch.distributed.destroy_process_group()  # the model alone (no metric waits for them)
    return Trained(
        unit="epoch",
        checkpoint=Path(checkpoint.best_model_path or last),
        selected_by=selection_rule(cfg, "epoch"),
        logger=events_logger(trainer),
        details={"epochs": trainer.current_epoch}
        | stopping_details(cfg, trainer, divergence)
        | ({"privacy": {"dp_sgd": private.describe()}} if private is not None else {}),
    )


def events_logger(trainer: L.Trainer) -> TensorBoardLogger:
    """The run's TensorBoard logger: `build_trainer` gives the Trainer it first."""
    logger = trainer.loggers[0]
    assert isinstance(logger, TensorBoardLogger)  # build_trainer's loggers: TensorBoard, CSV
    return logger


def private_training(cfg: Namespace, module, images: int) -> DPSGD | None:
    """DP-SGD on the run's one trainer (privacy.enabled), its budget spread over every epoch."""
    if not cfg.privacy.enabled:
        return None
    epochs = int(trainer_arguments(cfg)["max_epochs"])
    steps = planned_steps(images, cfg.data.batch_size, epochs)
    return make_private(
        module, cfg.privacy, images=images, batch_size=cfg.data.batch_size, planned_steps=steps
    )
