"""Training losses by name (the `loss.*` config group): the losses the review of ResNet
training choices compares (Zhou et al. 2020), each an `Objective` the LightningModule calls.

Every model still ends in a classifier with 2 outputs, and evaluation and predict always take
P(pneumonia) as the softmax of the model's output logits; a loss changes what those logits are
(a margin head, an L2-constrained Linear, a linear probe) and how the network learns. The
"embedding" is the input of that final classifier layer, read by `EmbeddingTap`.

How the module uses it, in this order:

    attach_head(model, cfg)              # margin / L2 heads replace the final Linear
    objective = make_objective(cfg, model, positive)   # register as a submodule
    tap = EmbeddingTap(model)            # only when objective.needs_embeddings
    logits = model(images)
    loss = objective(logits, tap.embeddings, labels, class_weights, label_smoothing)

The default, `cross_entropy`, adds no head, no parameters and no buffers, so the default model's
state dict and checkpoints are unchanged. Label smoothing stays `optim.label_smoothing` and the
class weights come from the trainer; `uses_class_weights` / `uses_label_smoothing` say which
losses honour them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from pneumonia.core.bounds import (
    NonNegativeFloat,
    OpenUnitInterval,
    PositiveFloat,
    PositiveInt,
)
from pneumonia.core.errors import UserError
from pneumonia.core.registry import Registry
from pneumonia.models.factory import classifier_layer as model_classifier_layer

NUM_CLASSES = 2


# --- the classifier layer and its input --------------------------------------------------


class MarginHead(nn.Module):
    """The classifier of a margin loss (L-Softmax, SphereFace, CosFace): it owns the
    pytorch-metric-learning loss, and so its class weight matrix `loss.W` [D, 2] as a parameter
    of the model (it travels in checkpoints and federated state dicts, under `<layer>.loss.W`).

    `head(x)` returns the loss's logits WITHOUT the margin (pml's `get_logits`); the margin
    applies to the target class in `head.loss(x, labels)` only, during training.
    """

    def __init__(self, in_features: int, out_features: int, loss: pml.LargeMarginSoftmaxLoss):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.loss = loss

    def forward(self, x: Tensor) -> Tensor:
        with full_precision(x):
            return self.loss.get_logits(x.float())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class L2SoftmaxLinear(nn.Linear):
    """L2-constrained softmax (Ranjan et al. 2017): a Linear applied to alpha * x / ||x||, so
    every embedding lies on a sphere of radius alpha. Same `weight` and `bias` as nn.Linear;
    alpha is fixed (the config's `loss.l2_alpha`), not learned."""

    def __init__(self, in_features: int, out_features: int, alpha: float, **kwargs) -> None:
        super().__init__(in_features, out_features, **kwargs)
        self.alpha = alpha

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.alpha * F.normalize(x, dim=1), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha}"


@contextlib.contextmanager
def full_precision(x: Tensor) -> Iterator[None]:
    """Autocast off around pml's losses: they cast their weight matrix's `.data` to the
    embeddings' dtype, which under bf16 autocast would leave a bf16 parameter behind."""
    if x.device.type in ("cpu", "cuda"):
        with torch.autocast(x.device.type, enabled=False):
            yield
    else:
        yield


def classifier_layer(model: nn.Module) -> tuple[nn.Module, str]:
    """`pneumonia.models.factory.classifier_layer`, refused in the words of loss.name."""
    try:
        return model_classifier_layer(model)
    except UserError:
        plain = [name for name in LOSSES if not LOSSES.get(name).reads_layer()]
        raise UserError(
            "the model has no final nn.Linear with 2 outputs, which this loss.name needs: "
            f"choose one of {', '.join(plain)}, or another model.name"
        ) from None


def _layer(model: nn.Module) -> nn.Module:
    parent, attr = classifier_layer(model)
    return getattr(parent, attr)


class EmbeddingTap:
    """Records the input of the model's classifier layer at every forward (a forward pre-hook):
    after `logits = model(images)`, `tap.embeddings` is that forward's [B, D] embeddings, with
    their graph. The module reads them from here for the losses that need them. Create it after
    `attach_head` (it hooks the layer in place then); `remove()` or `with EmbeddingTap(m) as t:`
    takes the hook off."""

    def __init__(self, model: nn.Module) -> None:
        self.embeddings: Tensor | None = None
        self._handle: RemovableHandle | None = _layer(model).register_forward_pre_hook(self._record)

    def _record(self, module: nn.Module, args: tuple) -> None:
        self.embeddings = args[0]

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle, self.embeddings = None, None

    def __enter__(self) -> EmbeddingTap:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __deepcopy__(self, memo: dict) -> EmbeddingTap:
        # Deep-copying the model (weight averaging does) copies its hooks, and so this tap: a
        # recorded non-leaf tensor cannot be deep-copied, and the copy records its own inputs.
        copy = object.__new__(EmbeddingTap)
        copy.embeddings, copy._handle = None, None
        return copy


# --- objectives and their registry -------------------------------------------------------


class Objective(nn.Module):
    """A training loss: `objective(logits, embeddings, labels, class_weights,
    label_smoothing)` is the batch's mean loss, float32. `embeddings` (the classifier layer's
    input, from `EmbeddingTap`) may be None unless `needs_embeddings`.

    Trainable tensors (center loss's centers) are the objective's own parameters; the
    classifier layer it reads (probe, margin head) is kept out of its submodules, so no tensor
    appears twice in a state dict.
    """

    needs_embeddings = False
    uses_class_weights = False
    # The loss is sum_i w_{y_i} l_i / sum_i w_{y_i} (weighted cross-entropy's reduction), not
    # the plain mean: how a process of a run on several devices weighs its share of a batch.
    class_weighted_mean = False
    uses_label_smoothing = False
    # The classifier layer this loss puts in the model, or None to keep the model's Linear.
    head_type: type[nn.Module] | None = None

    def __init__(self, cfg: LossConfig, layer: nn.Module | None, positive: int | None) -> None:
        super().__init__()
        if self.head_type is not None and not isinstance(layer, self.head_type):
            raise ValueError(f"{type(self).__name__}: call attach_head(model, cfg) first")
        # A plain tuple: an nn.Module attribute would register the layer as our submodule.
        self._layer = (layer,)

    @property
    def layer(self) -> nn.Module:
        """The classifier layer the loss reads; only losses that `reads_layer` are given one."""
        layer = self._layer[0]
        assert layer is not None, f"{type(self).__name__} reads no classifier layer"
        return layer

    @classmethod
    def reads_layer(cls) -> bool:
        """Whether the loss reads the classifier layer (its embeddings, or its own head)."""
        return cls.needs_embeddings or cls.head_type is not None

    @classmethod
    def make_head(cls, linear: nn.Linear, cfg: LossConfig) -> nn.Module:
        raise NotImplementedError(f"{cls.__name__} keeps the model's Linear")

    def forward(
        self,
        logits: Tensor,
        embeddings: Tensor | None,
        labels: Tensor,
        class_weights: Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> Tensor:
        logits = logits.float()
        if labels.numel() == 0:  # an empty (Poisson) batch: no loss, still a graph to step
            return logits.sum() * 0
        if self.needs_embeddings:
            if embeddings is None:
                raise ValueError(f"{type(self).__name__} needs the embeddings (EmbeddingTap)")
            embeddings = embeddings.float()
        return self.loss(logits, embeddings, labels, class_weights, label_smoothing)

    def loss(self, logits, embeddings, labels, class_weights, label_smoothing) -> Tensor:
        raise NotImplementedError


# `@LOSSES.register(name)` makes an Objective subclass available as `loss.name <name>`.
LOSSES: Registry[type[Objective]] = Registry("loss.name")


def _weighted_mean(per_image: Tensor, labels: Tensor, class_weights: Tensor | None) -> Tensor:
    """sum_i w_{y_i} l_i / sum_i w_{y_i}, the reduction of weighted cross-entropy."""
    if class_weights is None:
        return per_image.mean()
    w = class_weights.to(per_image)[labels]
    return (w * per_image).sum() / w.sum()


@LOSSES.register("cross_entropy")
class CrossEntropy(Objective):
    """-w_y log softmax(z)_y with label smoothing, the weighted mean over the batch: exactly
    the module's training loss before losses were configurable. P = softmax(z) of the Linear."""

    uses_class_weights = uses_label_smoothing = class_weighted_mean = True

    def loss(self, logits, embeddings, labels, class_weights, label_smoothing):
        return F.cross_entropy(
            logits, labels, weight=class_weights, label_smoothing=label_smoothing
        )


@LOSSES.register("softmax")
class Softmax(Objective):
    """The plain softmax loss -log softmax(z)_y, mean over the batch: cross-entropy without
    class weights or smoothing. P = softmax(z) of the Linear."""

    def loss(self, logits, embeddings, labels, class_weights, label_smoothing):
        return F.cross_entropy(logits, labels)


@LOSSES.register("mse")
class MeanSquaredError(Objective):
    """Mean squared error on the probabilities (the Brier score): per image
    sum_k (p_k - onehot(y)_k)^2 with p = softmax(z), the class-weighted mean like
    cross-entropy. P = softmax(z) of the Linear, the very probabilities it regresses."""

    uses_class_weights = class_weighted_mean = True

    def loss(self, logits, embeddings, labels, class_weights, label_smoothing):
        target = F.one_hot(labels, logits.shape[1]).to(logits)
        per_image = (logits.softmax(dim=1) - target).square().sum(dim=1)
        return _weighted_mean(per_image, labels, class_weights)


@LOSSES.register("hinge")
class Hinge(Objective):
    """Multi-class hinge on the logits (torch's multi_margin_loss): per image
    w_y sum_{k != y} max(0, m - (z_y - z_k)) / C, so for 2 classes
    w_y max(0, m - (z_y - z_other)) / 2 (torch divides by the class count), m = loss.margin;
    the plain mean over the batch (not divided by the weights' sum). P = softmax(z) of the
    Linear: a monotone score of the logit margin, not a calibrated probability."""

    uses_class_weights = True

    def __init__(self, cfg: LossConfig, layer: nn.Module | None, positive: int | None) -> None:
        super().__init__(cfg, layer, positive)
        self.margin = cfg.margin

    def loss(self, logits, embeddings, labels, class_weights, label_smoothing):
        weight = None if class_weights is None else class_weights.to(logits)
        return F.multi_margin_loss(logits, labels, margin=self.margin, weight=weight)


@LOSSES.register("focal")
class Focal(Objective):
    """Focal loss (Lin et al. 2017): -alpha_t (1 - p_t)^gamma log p_t, p_t = softmax(z)_y,
    mean over the batch. alpha_t = loss.alpha for the positive class and 1 - alpha for the
    other; with loss.alpha None, alpha_t = the class weight of y (1 without weights). gamma 0,
    alpha None and no weights is the softmax loss. P = softmax(z) of the Linear."""

    uses_class_weights = True

    def __init__(self, cfg: LossConfig, layer: nn.Module | None, positive: int | None) -> None:
        super().__init__(cfg, layer, positive)
        self.gamma, self.alpha, self.positive = cfg.gamma, cfg.alpha, positive

    def loss(self, logits, embeddings, labels, class_weights, label_smoothing):
        log_p = logits.log_softmax(dim=1).gather(1, labels[:, None])[:, 0]
        per_image = -(1 - log_p.exp()).pow(self.gamma) * log_p
        if self.alpha is not None:
            positive = labels == self.positive
            per_image = per_image * torch.where(positive, self.alpha, 1 - self.alpha)
        elif class_weights is not None:
            per_image = per_image * class_weights.to(per_image)[labels]
        return per_image.mean()


@LOSSES.register("l2_softmax")
class L2Softmax(Objective):
    """L2-constrained softmax (Ranjan et al. 2017): cross-entropy (class weights, smoothing)
    on z = W (alpha x / ||x||) + b, the L2SoftmaxLinear that replaces the classifier.
    P = softmax of those logits."""

    uses_class_weights = uses_label_smoothing = class_weighted_mean = True
    head_type = L2SoftmaxLinear

    @classmethod
    def make_head(cls, linear: nn.Linear, cfg: LossConfig) -> nn.Module:
        head = L2SoftmaxLinear(
            linear.in_features,
            linear.out_features,
            cfg.l2_alpha,
            bias=linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        head.load_state_dict(linear.state_dict())  # keep the Linear's initialisation
        return head

    def loss(self, logits, embeddings, labels, class_weights, label_smoothing):
        return F.cross_entropy(
            logits, labels, weight=class_weights, label_smoothing=label_smoothing
        )


class _MarginLoss(Objective):
    """The loss of a MarginHead: its pml loss on the embeddings, the margin applied to the
    target class, pml's mean over the batch. Class weights and smoothing do not apply."""

    needs_embeddings = True
    head_type = MarginHead

    @classmethod
    def make_head(cls, linear: nn.Linear, cfg: LossConfig) -> nn.Module:
        loss = cls.pml_loss(linear.in_features, cfg)
        loss.to(linear.weight.device)
        with torch.no_grad():  # start from the Linear's initialisation, not pml's N(0, 1)
            loss.W.copy_(linear.weight.t())
        return MarginHead(linear.in_features, linear.out_features, loss)

    @classmethod
    def pml_loss(cls, embedding_size: int, cfg: LossConfig) -> pml.LargeMarginSoftmaxLoss:
        raise NotImplementedError

    def loss(self, logits, embeddings, labels, class_weights, label_smoothing):
        with full_precision(embeddings):
            return self.layer.loss(embeddings, labels)


@LOSSES.register("l_softmax")
class LargeMarginSoftmax(_MarginLoss):
    """L-Softmax (Liu et al. 2016, pml's LargeMarginSoftmaxLoss): cross-entropy on
    ||W_k|| ||x|| psi(theta_k), psi(theta) = (-1)^j cos(m theta) - 2j for the target class
    (theta in [j pi/m, (j+1) pi/m]) and cos(theta) for the other, m = loss.angular_margin
    (an integer multiplier of the angle, as pml takes it). P = softmax of the head's
    margin-free logits ||W_k|| ||x|| cos(theta_k) = x . W_k: a Linear without bias. Liu et al.
    anneal the margin in; pml does not, so early training can be slow."""

    @classmethod
    def pml_loss(cls, embedding_size: int, cfg: LossConfig) -> pml.LargeMarginSoftmaxLoss:
        return pml.LargeMarginSoftmaxLoss(
            NUM_CLASSES, embedding_size, margin=cfg.angular_margin, scale=1
        )


@LOSSES.register("a_softmax")
class SphereFace(_MarginLoss):
    """A-Softmax (SphereFace, Liu et al. 2017, pml's SphereFaceLoss): L-Softmax with the
    class weights normalised: cross-entropy on ||x|| psi(theta_y) and ||x|| cos(theta_k),
    m = loss.angular_margin (integer multiplier). P = softmax of the head's margin-free logits
    ||x|| cos(theta_k)."""

    @classmethod
    def pml_loss(cls, embedding_size: int, cfg: LossConfig) -> pml.LargeMarginSoftmaxLoss:
        return pml.SphereFaceLoss(NUM_CLASSES, embedding_size, margin=cfg.angular_margin, scale=1)


@LOSSES.register("cosface")
class CosFace(_MarginLoss):
    """CosFace (Wang et al. 2018, pml's CosFaceLoss): -log of the softmax of
    s (cos(theta_y) - m) against s cos(theta_k), theta_k the angle between x and W_k,
    s = loss.scale, m = loss.cosine_margin. P = softmax of the head's margin-free logits
    s cos(theta_k)."""

    @classmethod
    def pml_loss(cls, embedding_size: int, cfg: LossConfig) -> pml.LargeMarginSoftmaxLoss:
        return pml.CosFaceLoss(
            NUM_CLASSES, embedding_size, margin=cfg.cosine_margin, scale=cfg.scale
        )


@LOSSES.register("center")
class Center(Objective):
    """Center loss (Wen et al. 2016): cross-entropy (class weights, smoothing) on the Linear's
    logits + loss.center_weight * 0.5 * mean_i ||e_i - c_{y_i}||^2, with the class centers
    `centers` [2, D] a parameter of this objective, starting at zero. The optimizer learns the
    centers by the gradient of that term (Wen et al. move them by their own update rule), so
    the module must pass the objective's parameters to it. P = softmax(z) of the Linear."""

    needs_embeddings = True
    uses_class_weights = uses_label_smoothing = True

    def __init__(self, cfg: LossConfig, layer: nn.Module | None, positive: int | None) -> None:
        super().__init__(cfg, layer, positive)
        self.center_weight = cfg.center_weight
        linear = self.layer
        assert isinstance(linear, nn.Linear)  # the model's own classifier: no head replaces it
        self.centers = nn.Parameter(
            torch.zeros(NUM_CLASSES, linear.in_features, device=linear.weight.device)
        )

    def loss(self, logits, embeddings, labels, class_weights, label_smoothing):
        ce = F.cross_entropy(logits, labels, weight=class_weights, label_smoothing=label_smoothing)
        pull = 0.5 * (embeddings - self.centers[labels]).square().sum(dim=1).mean()
        return ce + self.center_weight * pull


class _Probed(Objective):
    """A loss on the embeddings alone, plus a linear probe for P(pneumonia): the model's own
    classifier Linear learns at the same time by cross-entropy (class weights, smoothing) on
    the DETACHED embeddings, so no probe gradient reaches the backbone. P = softmax of the
    Linear's logits on the embeddings."""

    needs_embeddings = True
    uses_class_weights = uses_label_smoothing = True

    def loss(self, logits, embeddings, labels, class_weights, label_smoothing):
        probe = self.layer(embeddings.detach()).float()
        probe_loss = F.cross_entropy(
            probe, labels, weight=class_weights, label_smoothing=label_smoothing
        )
        return self.embedding_loss(embeddings, labels) + probe_loss

    def embedding_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        raise NotImplementedError


@LOSSES.register("contrastive")
class Contrastive(_Probed):
    """Contrastive loss (Hadsell et al. 2006, pml's ContrastiveLoss) over all pairs of the
    batch, on L2-normalised embeddings: d for same-class pairs, max(0, m - d) for the others,
    m = loss.margin, each kind averaged over its non-zero pairs, the two averages summed; plus
    the linear probe that gives P (see _Probed)."""

    def __init__(self, cfg: LossConfig, layer: nn.Module | None, positive: int | None) -> None:
        super().__init__(cfg, layer, positive)
        self.pairs = pml.ContrastiveLoss(pos_margin=0, neg_margin=cfg.margin)

    def embedding_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return self.pairs(embeddings, labels)


@LOSSES.register("euclidean")
class Euclidean(_Probed):
    """Euclidean (L2) loss: 0.5 * mean_i ||e_i - t_{y_i}||^2, the regression of each
    embedding onto a fixed code of its class, t_k the k-th unit vector of the embedding space,
    which (unlike pulling embeddings together) cannot collapse; plus the linear probe that
    gives P (see _Probed)."""

    def embedding_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        targets = F.one_hot(labels, embeddings.shape[1]).to(embeddings)
        return 0.5 * (embeddings - targets).square().sum(dim=1).mean()


LOSS_NAMES: tuple[str, ...] = LOSSES.names()  # the default first
# The CLI help and the parser list the registered names; a Literal only the parser can read.
LossName = Literal[LOSS_NAMES]  # type: ignore[valid-type]


@dataclass
class LossConfig:
    """The training loss (the `loss.*` config group); Zhou et al. 2020 compare these."""

    # The training objective (pneumonia.training.losses); validation scores every run by the
    # same log loss whatever it is.
    name: LossName = "cross_entropy"
    # hinge: the margin on z_y - z_other; contrastive: the distance unlike pairs must exceed.
    margin: PositiveFloat = 1.0
    # cosface: s. The face-recognition papers use 64 for thousands of identities; 2 classes
    # reach a confident softmax at a much smaller scale.
    scale: PositiveFloat = 16.0
    cosine_margin: NonNegativeFloat = 0.35  # cosface: m, subtracted from cos(theta_y)
    # l_softmax and a_softmax: the integer m multiplying the target angle (pml's `margin`
    # for these is that multiplier, not degrees as for its ArcFaceLoss).
    angular_margin: PositiveInt = 4
    l2_alpha: PositiveFloat = 16.0  # l2_softmax: the radius alpha of the embedding sphere
    center_weight: NonNegativeFloat = 0.01  # center: lambda of the center term
    gamma: NonNegativeFloat = 2.0  # focal: the focusing exponent
    # focal: the weight of the positive class (1 - alpha for the other), or null to weight
    # by the class weights as cross-entropy does.
    alpha: OpenUnitInterval | None = None


def check_loss(cfg: LossConfig, drop_connect: float) -> None:
    """What the loss rules out of the model config, in one line."""
    head = LOSSES.get(cfg.name).head_type
    if drop_connect > 0 and head is not None:
        raise UserError(
            f"model.drop_connect masks the classifier Linear that loss.name {cfg.name} "
            f"replaces by its own head: use model.drop_rate, or another loss"
        )


def attach_head(model: nn.Module, cfg: LossConfig) -> None:
    """In place: replace the model's classifier Linear by the head `cfg`'s loss needs
    (margin losses, l2_softmax), starting from the Linear's weights; other losses leave the
    model untouched. Call it before loading a checkpoint of that loss."""
    cls = LOSSES.get(cfg.name)
    if cls.head_type is None:
        return
    parent, attr = classifier_layer(model)
    layer = getattr(parent, attr)
    if isinstance(layer, cls.head_type):
        return
    if isinstance(layer, MarginHead | L2SoftmaxLinear):
        raise ValueError(f"the model already has a {type(layer).__name__}, not a Linear")
    setattr(parent, attr, cls.make_head(layer, cfg))


def make_objective(cfg: LossConfig, model: nn.Module, positive: int | None = 1) -> Objective:
    """The loss `cfg` names for `model` (after `attach_head`); `positive` is the index of the
    positive class (focal's alpha), None with more than two classes (the module's)."""
    cls = LOSSES.get(cfg.name)
    return cls(cfg, _layer(model) if cls.reads_layer() else None, positive)
