"""The LightningModule: a registry model, its loss, optimizer, schedule and metrics.

It holds the science; the DataModule holds the data and the Trainer the engineering. Images
arrive as uint8 (or as floats in [0, 1] after augmentation) and are normalised here, so a
checkpoint alone carries everything needed to evaluate or predict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger

from pneumonia.bounds import (
    FractionBelowOne,
    FractionUpToOne,
    NonNegativeFloat,
    NonNegativeInt,
    OpenUnitInterval,
    PositiveFloat,
    PositiveInt,
)
from pneumonia.data.imageset import CLASSES
from pneumonia.errors import UserError
from pneumonia.metrics import DiagnosisMetrics
from pneumonia.models.registry import ModelConfig, create_model


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (the `optim.*` config group)."""

    name: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: PositiveFloat = 1e-3
    momentum: FractionBelowOne = 0.9  # sgd only
    weight_decay: NonNegativeFloat = 1e-4
    scheduler: Literal["none", "step", "cosine", "plateau"] = "cosine"
    step_size: PositiveInt = 10  # step: epochs between decays
    gamma: FractionUpToOne = 0.1  # step and plateau: decay factor
    patience: NonNegativeInt = 2  # plateau: epochs without val/loss improvement
    label_smoothing: FractionBelowOne = 0.0
    # Centralized runs: validate and checkpoint an average of the weights instead of the
    # last ones: an exponential moving average over steps (ema, `ema_decay`), or the equal
    # average of the epoch-end weights from epoch `swa_start` x max_epochs on (swa).
    # Federated runs average rounds instead: federated.average_rounds.
    weight_averaging: Literal["none", "ema", "swa"] = "none"
    ema_decay: OpenUnitInterval = 0.995
    swa_start: FractionBelowOne = 0.5


def make_optimizer(params, cfg: OptimConfig, lr: float | None = None) -> torch.optim.Optimizer:
    """The optimizer `cfg` names over `params` (on their device already), at `lr` if given."""
    params = list(params)
    lr = cfg.lr if lr is None else lr
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    # One fused kernel per step instead of a dozen ops per tensor: the AdamW step of
    # SE-ResNet-18 took 95 ms on 2 CPU cores, 14 ms fused.
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in params)
    adam = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    return adam(params, lr=lr, weight_decay=cfg.weight_decay, fused=fused or None)


# What the module scores: training batches, the validation loaders in the DataModule's order
# (clean, then shifted: `pneumonia.data.shifts`), and the test split.
STAGES = ("train", "val", "val_shift", "test")
VALIDATION_STAGES = ("val", "val_shift")


class ClassifierModule(L.LightningModule):
    """NORMAL vs PNEUMONIA classifier; logs train/, val/ and test/ metrics."""

    def __init__(
        self,
        model: dict,
        optim: dict,
        image_size: int,
        classes: tuple[str, ...] = CLASSES,
        positive_class: str = "PNEUMONIA",
        class_weights: list[float] | None = None,
        mean: float = 0.5,
        std: float = 0.25,
        threshold: float = 0.5,
    ) -> None:
        super().__init__()
        # The recipe (pneumonia.recipe) is the checkpoint's hyper-parameters; class weights
        # belong to one trainer's images (one client's, in a federation), not to the model.
        self.save_hyperparameters(ignore=["class_weights"])
        if positive_class not in classes:
            raise UserError(f"positive_class {positive_class!r} is not one of {', '.join(classes)}")
        self.classes = tuple(classes)
        self.positive = self.classes.index(positive_class)
        self.optim_cfg = OptimConfig(**optim)
        # Where the next fit's optimizer starts (Lightning's LR finder sets this attribute too);
        # a federated client sets its round's rate here (federated.round_lr).
        self.learning_rate = self.optim_cfg.lr
        self.model = create_model(ModelConfig(**model), image_size)
        weights = torch.tensor(class_weights, dtype=torch.float) if class_weights else None
        # Not persistent: client-specific, and must not travel inside aggregated state dicts.
        self.register_buffer("class_weights", weights, persistent=False)
        self.metrics = torch.nn.ModuleDict(
            {f"{stage}_metrics": DiagnosisMetrics(threshold) for stage in STAGES}
        )
        # DP-SGD (pneumonia.privacy.DPSGD sets it): the per-image loss, the private optimizer
        # and NCHW layout. Not a hyper-parameter: a private model's checkpoint is a checkpoint.
        self.privacy = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits [B, 2] for uint8 images or floats in [0, 1]."""
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        images = (images - self.hparams.mean) / self.hparams.std
        if images.is_cuda and self.privacy is None:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.model(images)

    def on_fit_start(self) -> None:
        # Tensor cores want NHWC; forward() hands the images over in that layout too. Not
        # under DP: Opacus's per-sample gradients of 1x1 convolutions assume NCHW strides.
        if self.device.type == "cuda" and self.privacy is None:
            self.model.to(memory_format=torch.channels_last)

    def positive_probability(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().softmax(dim=1)[:, self.positive]

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = self._loss(logits, labels, stage == "train")
        if len(labels) == 0:  # a Poisson batch may be empty: DP-SGD still steps (noise only)
            return loss
        self.metrics[f"{stage}_metrics"].update(
            self.positive_probability(logits), labels == self.positive
        )
        self.log(
            f"{stage}/loss",
            loss,
            on_step=stage == "train",
            on_epoch=True,
            prog_bar=stage in ("train", "val"),
            batch_size=len(labels),
            add_dataloader_idx=False,  # val/loss and val_shift/loss, not val/loss/dataloader_idx_0
        )
        return loss

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor, training: bool) -> torch.Tensor:
        """Class weights and smoothing shape training only; val/test report the plain
        cross-entropy, the same loss the federated server and `evaluation` report."""
        if not training:
            return F.cross_entropy(logits.float(), labels)
        smoothing = self.optim_cfg.label_smoothing
        if self.privacy is None:
            return F.cross_entropy(
                logits.float(), labels, weight=self.class_weights, label_smoothing=smoothing
            )
        # DP-SGD bounds each image's influence, so no image's loss may depend on the others:
        # the weighted mean divides by the batch's sum of weights, which does. Each image's
        # own weighted loss, averaged over the batch (Opacus's loss_reduction "mean").
        per_image = F.cross_entropy(
            logits.float(),
            labels,
            weight=self.class_weights,
            label_smoothing=smoothing,
            reduction="none",
        )
        return per_image.sum() / max(len(labels), 1)

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._step(batch, VALIDATION_STAGES[dataloader_idx])

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def on_train_epoch_end(self) -> None:
        self._log_epoch_metrics("train")
        if self.privacy is not None:  # epsilon beside accuracy: the price of this epoch
            self.log("train/epsilon", self.privacy.epsilon(), prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        for stage in VALIDATION_STAGES:
            if self.metrics[f"{stage}_metrics"].has_updates():
                self._log_epoch_metrics(stage)

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    def _log_epoch_metrics(self, stage: str) -> None:
        metrics = self.metrics[f"{stage}_metrics"]
        values = metrics.compute()
        self.log_dict(
            {f"{stage}/{k}": v for k, v in values.items() if isinstance(v, float)}, prog_bar=False
        )
        if stage != "train" and not self.trainer.sanity_checking:
            self._log_figures(stage, metrics)
        metrics.reset()

    @property
    def negative_and_positive(self) -> tuple[str, str]:
        """Class names in the order the binary metrics use: (negative, positive)."""
        return self.classes[1 - self.positive], self.classes[self.positive]

    def _log_figures(self, stage: str, metrics: DiagnosisMetrics) -> None:
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                for name, figure in metrics.figures(self.negative_and_positive).items():
                    logger.experiment.add_figure(f"{stage}/{name}", figure, self.current_epoch)

    def configure_optimizers(self):
        optimizer = make_optimizer(self.model.parameters(), self.optim_cfg, self.learning_rate)
        if self.privacy is not None:
            optimizer = self.privacy.wrap(optimizer)
        return self._with_scheduler(optimizer)

    def _with_scheduler(self, optimizer):
        cfg = self.optim_cfg
        sched = torch.optim.lr_scheduler
        if cfg.scheduler == "step":
            return [optimizer], [sched.StepLR(optimizer, cfg.step_size, cfg.gamma)]
        if cfg.scheduler == "cosine":
            # The epochs of this fit call: all of them centrally, E per round on a client.
            epochs = max(int(self.trainer.max_epochs or 1) - self.trainer.current_epoch, 1)
            return [optimizer], [sched.CosineAnnealingLR(optimizer, T_max=epochs)]
        if cfg.scheduler == "plateau":
            plateau = sched.ReduceLROnPlateau(optimizer, factor=cfg.gamma, patience=cfg.patience)
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": plateau, "monitor": "val/loss"},
            }
        return optimizer
