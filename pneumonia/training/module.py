"""The LightningModule: a registry model, its loss, optimizer, schedule and metrics.

It holds the science; the DataModule holds the data and the Trainer the engineering. Images
arrive as uint8 (or as floats in [0, 1] after augmentation) and are normalised here, so a
checkpoint alone carries everything needed to evaluate or predict.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, cast

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.weak import WeakTensorKeyDictionary
from torchmetrics import MeanMetric

from pneumonia.core.bounds import (
    FractionBelowOne,
    FractionUpToOne,
    NonNegativeFloat,
    NonNegativeInt,
    OpenUnitInterval,
    PositiveFloat,
    PositiveInt,
)
from pneumonia.core.errors import UserError
from pneumonia.data.imageset import CLASSES, NEGATIVE_CLASS
from pneumonia.metrics.classification import ClassMetrics, DiagnosisMetrics, binary_log_loss
from pneumonia.models.factory import IN_CHANS, ModelConfig, classifier_layer, create_model
from pneumonia.models.transfer import freeze
from pneumonia.training.losses import EmbeddingTap, LossConfig, attach_head, make_objective
from pneumonia.training.optimizers import OPTIMIZER_NAMES, make_optimizer
from pneumonia.training.schedules import DECAY_NAMES, DecayConfig, lambda_scheduler

if TYPE_CHECKING:  # privacy imports Opacus: loaded only where DP-SGD is used
    from pneumonia.training.privacy import DPSGD

log = logging.getLogger(__name__)

# A fixed front end's features of an image tensor (an ImageSet's images), per front end and
# normalisation: computed once, kept while the images live. Beside the module, not in it: a
# deep copy of the module (weight averaging) must not copy them.
# torch's weak dictionary compares keys by identity (a WeakKeyDictionary would compare tensors
# with ==, element by element).
_FRONT_CACHE = WeakTensorKeyDictionary()
FRONT_CACHE_BYTES = 4 * 2**30  # larger feature sets are computed batch by batch instead

SCHEDULERS = ("none", "step", "plateau", "onecycle") + tuple(
    name for name in DECAY_NAMES if name != "constant"
)


@dataclass
class OptimConfig:
    """Optimizer, learning-rate schedule and weight penalties (the `optim.*` config group)."""

    # The optimizer (pneumonia.training.optimizers; momentum and nesterov are SGD's).
    name: Literal[OPTIMIZER_NAMES] = "adamw"  # type: ignore[valid-type]  # registry names
    lr: PositiveFloat = 1e-3  # the base learning rate, which the schedule scales
    momentum: FractionBelowOne = 0.9  # momentum and nesterov only
    weight_decay: NonNegativeFloat = 1e-4  # the L2 penalty (AdamW: decoupled)
    l1: NonNegativeFloat = 0.0  # L1 penalty: l1 x the sum of |w| over conv and linear weights
    # step (StepLR), plateau (ReduceLROnPlateau on val/loss), onecycle (OneCycleLR), cosine
    # (CosineAnnealingLR) or one of TensorFlow's decays (pneumonia.training.schedules; their
    # parameters and the warm-up are optim.decay.*), stepped every `interval`.
    scheduler: Literal[SCHEDULERS] = "cosine"  # type: ignore[valid-type]  # as name
    interval: Literal["epoch", "step"] = "epoch"  # the schedule steps each epoch, or each step
    step_size: PositiveInt = 10  # step: epochs between decays
    gamma: FractionUpToOne = 0.1  # step and plateau: decay factor
    patience: NonNegativeInt = 2  # plateau: epochs without val/loss improvement
    decay: DecayConfig = field(default_factory=DecayConfig)
    # Share of each target spread evenly over the classes (the losses that take it:
    # pneumonia.training.losses).
    label_smoothing: FractionBelowOne = 0.0
    # Centralized runs: validate and checkpoint an average of the weights instead of the
    # last ones: an exponential moving average over steps (ema, `ema_decay`), or the equal
    # average of the epoch-end weights from epoch `swa_start` x max_epochs on (swa).
    # Federated runs average rounds instead: federated.average_rounds.
    weight_averaging: Literal["none", "ema", "swa"] = "none"
    ema_decay: OpenUnitInterval = 0.995  # ema: the weight of the average at each step
    swa_start: FractionBelowOne = 0.5  # swa: the share of max_epochs before averaging starts

    def __post_init__(self) -> None:
        if isinstance(self.decay, dict):  # from a checkpoint's recipe or a Flower message
            self.decay = DecayConfig(**self.decay)


def make_scheduler(optimizer, cfg: OptimConfig, units: int):
    """The learning-rate scheduler of `cfg` over `units` epochs or steps of this fit (plateau
    is built by the module: it needs a monitor). torch.optim.lr_scheduler's own
    where it has the schedule; TensorFlow's decays as a LambdaLR of their formula."""
    sched = torch.optim.lr_scheduler
    if cfg.scheduler == "step":
        return sched.StepLR(optimizer, cfg.step_size, cfg.gamma)
    if cfg.scheduler == "onecycle":
        return sched.OneCycleLR(
            optimizer, max_lr=optimizer.param_groups[0]["lr"], total_steps=units
        )
    warm = cfg.decay.warmup > 0
    if cfg.scheduler == "cosine" and not warm and cfg.decay.decay_steps == 0:
        # TF's cosine_decay with its floor alpha x lr; torch's own (the default's numbers).
        eta_min = cfg.decay.alpha * optimizer.param_groups[0]["lr"]
        return sched.CosineAnnealingLR(optimizer, T_max=units, eta_min=eta_min)
    name = "constant" if cfg.scheduler == "none" else cfg.scheduler  # none: the warm-up alone
    return lambda_scheduler(optimizer, name, units, cfg.decay)


def positive_indices(classes: tuple[str, ...], positive_class: str) -> list[int]:
    """The class indices that count as positive: `positive_class` of two classes; with more,
    every class but NORMAL (positive_class then names them together: PNEUMONIA)."""
    if len(classes) == 2:
        if positive_class not in classes:
            raise UserError(f"positive_class {positive_class!r} is not one of {', '.join(classes)}")
        return [classes.index(positive_class)]
    if NEGATIVE_CLASS not in classes or positive_class != "PNEUMONIA":
        raise UserError(
            f"classes {', '.join(classes)}: with more than two classes the positive_class is "
            f"PNEUMONIA (every class but {NEGATIVE_CLASS}): drop --positive_class"
        )
    return [i for i, c in enumerate(classes) if c != NEGATIVE_CLASS]


# What the module scores: training batches and the validation loaders in the DataModule's
# order (clean, then shifted: `pneumonia.data.shifts`). Test and held-out images are scored
# after training (`pneumonia.inference.scoring`).
STAGES = ("train", "val", "val_shift")
VALIDATION_STAGES = ("val", "val_shift")


class ClassifierModule(L.LightningModule):
    """NORMAL vs PNEUMONIA classifier; logs train/, val/ and val_shift/ metrics."""

    # Buffers, which register_buffer adds at run time.
    positive_index: torch.Tensor
    class_weights: torch.Tensor | None

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
        loss: dict | None = None,
        roi: str = "full",  # what prediction crops to, as training did (data.roi); kept only
        intensity: str = "none",  # how prediction standardises grey levels (data.intensity)
    ) -> None:
        super().__init__()
        # The recipe (pneumonia.training.recipe) is the checkpoint's hyper-parameters; class weights
        # belong to one trainer's images (one client's, in a federation), not to the model.
        self.save_hyperparameters(ignore=["class_weights"])
        self.classes = tuple(classes)
        self.positives = positive_indices(self.classes, positive_class)
        # The binary positive's index; with three classes every cause of pneumonia is positive
        # and P(positive) is their summed probability (`positive_probability`).
        self.positive = self.positives[0] if len(self.classes) == 2 else None
        # For is_positive on every batch: built once, moved with the module, never saved.
        self.register_buffer("positive_index", torch.tensor(self.positives), persistent=False)
        self.optim_cfg = OptimConfig(**optim)
        # Where the next fit's optimizer starts (Lightning's LR finder sets this attribute too);
        # a federated client sets its round's rate here (federated.round_lr).
        self.learning_rate = self.optim_cfg.lr
        # Validation figures to TensorBoard every N epochs (0: none; --figures_every).
        self.figures_every = 1
        model_cfg = ModelConfig(**model)
        self.model = create_model(model_cfg, image_size, len(self.classes))
        # The training objective (pneumonia.training.losses). Margin losses and the L2-constrained
        # softmax put their own head in place of the classifier layer (its logits are what
        # evaluation and prediction take the softmax of); the default leaves the model as is.
        self.loss_cfg = LossConfig(**(loss or {}))
        attach_head(self.model, self.loss_cfg)
        self.objective = make_objective(self.loss_cfg, self.model, self.positive)
        # model.transfer: layers of a pretrained model that stay as loaded (and their norms'
        # statistics); the classifier (or a loss's head in its place) always trains.
        head = getattr(*classifier_layer(self.model, len(self.classes)))
        self.frozen = freeze(self.model, model_cfg.transfer, head)
        self.frozen.hold()
        self.tap = EmbeddingTap(self.model) if self.objective.needs_embeddings else None
        weights = torch.tensor(class_weights, dtype=torch.float) if class_weights else None
        # Not persistent: client-specific, and must not travel inside aggregated state dicts.
        self.register_buffer("class_weights", weights, persistent=False)
        self.metrics = torch.nn.ModuleDict(
            {f"{stage}_metrics": DiagnosisMetrics(threshold) for stage in STAGES}
        )
        # Each stage's mean loss on several devices (`_log_loss`); float64 as the log loss.
        self.loss_means = torch.nn.ModuleDict(
            {f"{stage}_loss": MeanMetric().set_dtype(torch.float64) for stage in STAGES}
        )
        # Three classes: per-class and macro figures beside the pneumonia-vs-normal ones.
        self.class_metrics = (
            torch.nn.ModuleDict(
                {f"{stage}_classes": ClassMetrics(self.classes) for stage in STAGES}
            )
            if len(self.classes) > 2
            else None
        )
        # DP-SGD (pneumonia.training.privacy.DPSGD sets it): the per-image loss, the private
        # optimizer and NCHW layout. Not a hyper-parameter: a private model's checkpoint is a
        # checkpoint.
        self.privacy: DPSGD | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits [B, 2] for uint8 images or floats in [0, 1], or for the features
        `fixed_features` made of them (more channels than an image has)."""
        if images.shape[1] != IN_CHANS:  # only a model with a fixed_front() has head()
            return cast(torch.Tensor, self.model.head(images))  # type: ignore[operator]
        images = self.normalise(images)
        if images.is_cuda and self.privacy is None:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.model(images)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images or floats in [0, 1], standardised with the run's pixel mean and std."""
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        return (images - self.hparams["mean"]) / self.hparams["std"]

    def fixed_features(self, images: torch.Tensor) -> torch.Tensor | None:
        """The model's fixed front end (`fixed_front()`: no weights, as the scattering models
        have) applied to images [N, 1, S, S] (uint8, or floats in [0, 1]), computed once for
        this tensor and then served from memory; None for a model without one, or features
        over FRONT_CACHE_BYTES.
        forward() takes them in place of the images."""
        front_of = getattr(self.model, "fixed_front", None)
        if front_of is None:
            return None
        front = front_of()
        key = (repr(front), float(self.hparams["mean"]), float(self.hparams["std"]))
        cached = _FRONT_CACHE.setdefault(images, {})
        if key not in cached:
            features = self._front_pass(front, images)
            if features is None:
                return None
            cached[key] = features
        return cached[key]

    @torch.no_grad()  # not inference_mode: training takes these as inputs to autograd
    def _front_pass(self, front: torch.nn.Module, images: torch.Tensor) -> torch.Tensor | None:
        started, out = time.perf_counter(), []
        for start in range(0, len(images), 256):
            batch = self.normalise(images[start : start + 256].to(self.device))
            out.append(front(batch.float()).cpu())
            if len(images) * out[0][0].numel() * 4 > FRONT_CACHE_BYTES:
                return None
        features = torch.cat(out) if out else torch.empty(0)
        log.info(
            "%s: front end computed once for %d images (%.1f s, %.0f MB)",
            self.hparams["model"]["name"],
            len(images),
            time.perf_counter() - started,
            features.numel() * 4 / 2**20,
        )
        return features

    def train(self, mode: bool = True):
        super().train(mode)
        self.frozen.hold()  # frozen BatchNorms keep their running statistics
        return self

    def on_train_epoch_start(self) -> None:
        # Modules start in train mode, and Lightning restores each submodule's own mode after
        # validation: hold the frozen norms in eval at every epoch whatever happened between.
        self.frozen.hold()

    def on_fit_start(self) -> None:
        # Tensor cores want NHWC; forward() hands the images over in that layout too. Not
        # under DP: Opacus's per-sample gradients of 1x1 convolutions assume NCHW strides. A
        # CPU keeps NCHW: channels_last trained slower there with bf16 autocast
        # (`python bench/train_step.py --channels_last`).
        if self.device.type == "cuda" and self.privacy is None:
            self.model.to(memory_format=torch.channels_last)

    def positive_probability(self, logits: torch.Tensor) -> torch.Tensor:
        """P(positive): of the positive class, or the summed probability of every pneumonia."""
        probs = logits.float().softmax(dim=1)
        if len(self.positives) == 1:
            return probs[:, self.positives[0]]
        return probs[:, self.positives].sum(dim=1)

    def is_positive(self, labels: torch.Tensor) -> torch.Tensor:
        """Whether each class label is a positive (any pneumonia, with three classes)."""
        return torch.isin(labels, self.positive_index.to(labels.device))

    def _step(self, batch: tuple[torch.Tensor, ...], stage: str) -> torch.Tensor:
        images, labels, *chunk = batch  # chunk: [ends_step] under DP's logical batches
        if stage == "train" and self.privacy is not None:
            self.privacy.before_backward(labels, ends_step=bool(chunk[0]) if chunk else True)
        logits = self(images)
        probs, positive = self.positive_probability(logits), self.is_positive(labels)
        if stage == "train":
            loss = self.training_loss(logits, labels)
        else:  # the diagnosis's log loss, as a federation's rounds and the final scoring
            loss = binary_log_loss(probs, positive)
        if len(labels) == 0:  # a Poisson batch may be empty: DP-SGD still steps (noise only)
            return loss
        self._diagnosis_metrics(stage).update(probs, positive)
        if (per_class := self._class_metrics(stage)) is not None:
            per_class.update(logits.float().softmax(dim=1), labels)
        self._log_loss(stage, loss, len(labels))
        return loss

    def _log_loss(self, stage: str, loss: torch.Tensor, images: int) -> None:
        """{stage}/loss: the epoch's mean over images (and each training step's)."""
        value: torch.Tensor | MeanMetric = loss
        if self._trainer is not None and self.trainer.world_size > 1:
            # On N processes (DDP) each has a share of the images: a MeanMetric weighs each
            # batch by its images and syncs its sums, where Lightning's sync_dist would average
            # the processes' means. (The other metrics are torchmetrics': they sync themselves.)
            value = cast(MeanMetric, self.loss_means[f"{stage}_loss"])
            value(loss.detach().double(), images)
        self.log(
            f"{stage}/loss",
            value,
            on_step=stage == "train",
            on_epoch=True,
            prog_bar=stage in ("train", "val"),
            batch_size=images,
            add_dataloader_idx=False,  # val/loss and val_shift/loss, not val/loss/dataloader_idx_0
        )

    def training_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training objective: loss.name, class weights, smoothing, the L1 penalty.
        Validation reports `binary_log_loss` of P(positive) instead, whatever the objective
        (per batch; Lightning's epoch mean, weighted by batch size, is the mean over images)."""
        smoothing = self.optim_cfg.label_smoothing
        if self.privacy is not None:
            return self._private_loss(logits, labels, smoothing)
        embeddings = self.tap.embeddings if self.tap is not None else None
        loss = self.objective(logits, embeddings, labels, self.class_weights, smoothing)
        if self.optim_cfg.l1 > 0:
            loss = loss + self.optim_cfg.l1 * self.l1_norm()
        return loss

    def _private_loss(self, logits, labels, smoothing: float) -> torch.Tensor:
        # DP-SGD bounds each image's influence, so no image's loss may depend on the others:
        # each image's own loss, averaged over the batch (Opacus's loss_reduction "mean").
        # Class weights act after clipping (privacy.class_weights), not here.
        per_image = F.cross_entropy(
            logits.float(), labels, label_smoothing=smoothing, reduction="none"
        )
        return per_image.sum() / max(len(labels), 1)

    def l1_norm(self) -> torch.Tensor:
        """Sum of |w| over the weights of convolutions and linear layers (not norms, biases)."""
        # as_tensor returns the sum itself (sum() types it as possibly its start, 0).
        return torch.as_tensor(sum(p.abs().sum() for p in self.model.parameters() if p.ndim > 1))

    def training_step(self, batch, batch_idx):
        loss = self._step(batch, "train")
        if self.privacy is None and self._trainer is not None and self.trainer.world_size > 1:
            return loss * self._global_share(batch[1])
        return loss

    def _global_share(self, labels: torch.Tensor) -> torch.Tensor:
        """On N processes DDP averages their gradients. Each process's mean loss, scaled by N x
        its share of the global batch's weight (its images, or their class weights where the
        loss is the class-weighted mean), makes that average the gradient of the whole batch's
        mean loss, as one process computes it, also when the shares differ in size or in
        classes. Exact for losses that are such a mean over images; a loss that couples the
        images of a batch (contrastive) sees only each process's share."""
        weights = self.class_weights if self.objective.class_weighted_mean else None
        local = (
            weights.to(labels.device)[labels].sum()
            if weights is not None
            else torch.tensor(float(len(labels)))
        )
        local = local.to(self.device, torch.float32)
        total = self.trainer.strategy.reduce(local.clone(), reduce_op="sum")
        return local * self.trainer.world_size / total

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        if len(batch[1]):  # a process's share of a last batch smaller than the processes
            self._step(batch, VALIDATION_STAGES[dataloader_idx])

    def on_train_epoch_end(self) -> None:
        self._log_epoch_metrics("train")
        if self.privacy is not None:  # epsilon beside accuracy: the price of this epoch
            self.log("train/epsilon", self.privacy.epsilon(), prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        for stage in VALIDATION_STAGES:
            if self._diagnosis_metrics(stage).has_updates():
                self._log_epoch_metrics(stage)

    def _log_epoch_metrics(self, stage: str) -> None:
        metrics = self._diagnosis_metrics(stage)
        values = metrics.compute()
        self.log_dict(
            {f"{stage}/{k}": v for k, v in values.items() if isinstance(v, float)}, prog_bar=False
        )
        if stage != "train" and self._figure_epoch():
            self._log_figures(stage, metrics)
        metrics.reset()
        if (per_class := self._class_metrics(stage)) is not None:
            values = per_class.compute()
            self.log_dict({f"{stage}/{k}": v for k, v in values.items() if isinstance(v, float)})
            if stage != "train" and self._figure_epoch():
                for logger in self.loggers:
                    if isinstance(logger, TensorBoardLogger):
                        figure = per_class.confusion_figure()
                        logger.experiment.add_figure(
                            f"{stage}/confusion_matrix_classes", figure, self.current_epoch
                        )
            per_class.reset()

    # A ModuleDict's values are typed Module: __init__ fills these two with metric objects.
    def _diagnosis_metrics(self, stage: str) -> DiagnosisMetrics:
        return cast(DiagnosisMetrics, self.metrics[f"{stage}_metrics"])

    def _class_metrics(self, stage: str) -> ClassMetrics | None:
        """The stage's three-class metrics; None with two classes."""
        if self.class_metrics is None:
            return None
        return cast(ClassMetrics, self.class_metrics[f"{stage}_classes"])

    def _figure_epoch(self) -> bool:
        """Whether this validation draws its figures: every `figures_every`-th epoch."""
        every = self.figures_every
        return not self.trainer.sanity_checking and every > 0 and self.current_epoch % every == 0

    @property
    def negative_and_positive(self) -> tuple[str, str]:
        """Class names in the order the binary metrics use: (negative, positive)."""
        if self.positive is None:
            return NEGATIVE_CLASS, self.hparams["positive_class"]
        return self.classes[1 - self.positive], self.classes[self.positive]

    def _log_figures(self, stage: str, metrics: DiagnosisMetrics) -> None:
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                for name, figure in metrics.figures(self.negative_and_positive).items():
                    logger.experiment.add_figure(f"{stage}/{name}", figure, self.current_epoch)

    def configure_optimizers(self):
        params = [*self.model.parameters(), *self.objective.parameters()]
        params = [p for p in params if p.requires_grad]  # frozen by model.transfer
        optimizer = make_optimizer(params, self.optim_cfg, self.learning_rate)
        if self.privacy is not None:
            optimizer = self.privacy.wrap(optimizer)
        return self._with_scheduler(optimizer)

    def _with_scheduler(self, optimizer):
        cfg = self.optim_cfg
        if cfg.scheduler == "plateau":
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, factor=cfg.gamma, patience=cfg.patience
            )
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": plateau, "monitor": "val/loss"},
            }
        if cfg.scheduler == "none" and cfg.decay.warmup == 0:
            return optimizer
        scheduler = make_scheduler(optimizer, cfg, self._schedule_units())
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": cfg.interval},
        }

    def _schedule_units(self) -> int:
        """The epochs or optimizer steps of this fit call: all of them centrally, E epochs per
        round on a federated client."""
        if self.optim_cfg.interval == "step":
            return max(int(self.trainer.estimated_stepping_batches), 1)
        return max(int(self.trainer.max_epochs or 1) - self.trainer.current_epoch, 1)
