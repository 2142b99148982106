"""Models by name: our registered builders, plus any timm model as `timm/<name>`.

As in timm, the registry imports no model: each model module registers its builders with
`@MODELS.register`, and `pneumonia.models` imports those modules, so importing any part of the
package fills the registry.

Every model takes 1-channel images and returns one logit per class: 2 (NORMAL, PNEUMONIA) by
default, 3 (NORMAL, BACTERIA, VIRUS) for `data.task three_class` (`create_model`'s
`num_classes`). `model.head` puts the thesis's head in place of a model's classifier
(`pneumonia.models.heads`).

A builder takes the ModelConfig; one registered with `takes_size=True` also takes the image
side in pixels (`builder(cfg, image_size)`), for layers whose shape follows it (scatter_linear's
Linear on the whole scattering map), and `create_model` refuses to build it without a size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, cast

import torch
from torch import nn

from pneumonia.core.bounds import (
    AtLeastOne,
    ClosedUnitInterval,
    FractionBelowOne,
    MaxoutPieces,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Width,
)
from pneumonia.core.errors import UserError, first_line
from pneumonia.core.registry import Registry
from pneumonia.models.heads import classifier_layer, replace_classifier
from pneumonia.models.layers import ACTIVATION_NAMES, DropConnectLinear
from pneumonia.models.mixstyle import attach_mixstyle
from pneumonia.models.pretrained import load_pretrained

IN_CHANS = 1
NUM_CLASSES = 2  # what every builder returns; create_model changes the output layer if asked
TIMM_PREFIX = "timm/"


@dataclass
class ModelConfig:
    """Which network to build (the `model.*` config group)."""

    # The network: a registered name (pneumonia.models), or timm/NAME for any model of timm.
    name: str = "se_resnet18"
    # BatchNorm, GroupNorm, or batch renormalisation (Ioffe 2017: BatchNorm corrected towards
    # its running statistics by r and d, clipped to brn_r_max and brn_d_max; both limits
    # ramp up from BatchNorm's 1 and 0 over brn_warmup training steps).
    norm: Literal["bn", "gn", "brn"] = "gn"
    gn_groups: PositiveInt = 16  # GroupNorm's groups (norm gn, the thesis head)
    brn_r_max: AtLeastOne = 3.0  # norm brn: the limit of r (1: BatchNorm)
    brn_d_max: NonNegativeFloat = 5.0  # norm brn: the limit of d (0: BatchNorm)
    brn_warmup: NonNegativeInt = 500  # norm brn: training steps over which both limits ramp up
    se_reduction: PositiveInt = 16  # squeeze-excitation (and CBAM): channels C / r in the gate
    # First-stage channels of the ResNet family (paper: 64). Smaller widths make the quick
    # models the tests and smoke runs use; other models refuse anything but 64. At most 512
    # (bounds.Width: twice the widest published ResNet).
    width: Width = 64
    # The ResNet family's activation (every block and the stem; SE gates keep theirs), with
    # the parameters of maxout (pieces) and noisy softplus (k, sigma): pneumonia.models.layers.
    activation: Literal[ACTIVATION_NAMES] = "relu"  # type: ignore[valid-type]  # registry names
    maxout_pieces: MaxoutPieces = 2  # activation maxout: the pieces it takes the maximum of
    noisy_softplus_k: PositiveFloat = 0.5  # activation noisy_softplus: k (k x sigma 1: softplus)
    noisy_softplus_sigma: PositiveFloat = 1.0  # activation noisy_softplus: the noise level sigma
    drop_rate: FractionBelowOne = 0.0  # dropout on the features before the classifier
    # Inside the blocks: DropBlock (Ghiasi et al. 2018, timm's) in the last two stages.
    block_drop_rate: FractionBelowOne = 0.0
    drop_connect: FractionBelowOne = 0.0  # DropConnect on the classifier's weights
    # MixStyle (Zhou et al., ICLR 2021): the probability per training batch that the channel
    # statistics after layer1 and layer2 are mixed between images (Beta(alpha, alpha)), new
    # styles without extra data (pneumonia.models.mixstyle). No weights; off in eval. 0: off.
    mixstyle: ClosedUnitInterval = 0.0
    mixstyle_alpha: PositiveFloat = 0.1  # mixstyle: alpha of the Beta(alpha, alpha) mixing weights
    pretrained: str | None = None  # local weights file (ImageNet, or a checkpoint of ours)
    # The ResNet family's attention block in every residual block: auto is the one the name
    # says (se_resnet*: se; resnet*: none); cbam and eca are timm's CbamModule and EcaModule.
    attention: Literal["auto", "none", "se", "cbam", "eca"] = "auto"
    # linear: the model's own classifier; thesis: BN, Dropout, Linear 256, ReLU, BN, Dropout,
    # Linear after global pooling (GroupNorm in place of BN when model.norm gn).
    head: Literal["linear", "thesis"] = "linear"
    head_dropout: FractionBelowOne = 0.5  # head thesis: the rate of its two dropouts
    # What trains after model.pretrained is loaded: finetune (everything), freeze:K (not the
    # stem and the first K stages), features (only the head): pneumonia.models.transfer.
    transfer: str = "finetune"
    # A stacking or soft-voting ensemble's members and meta-learner (model.name ensemble;
    # written by `python -m pneumonia.ensemble`, not by hand).
    ensemble: dict | None = None


Builder = Callable[[ModelConfig], nn.Module]
SizedBuilder = Callable[[ModelConfig, int], nn.Module]  # registered with takes_size=True
# `@MODELS.register(name, takes_width=True)` for our ResNet family: it honours model.width and
# the family's options (check_family_options). `takes_size=True`: the builder takes the image
# size too (module docstring).
MODELS: Registry[Builder | SizedBuilder] = Registry(
    "model.name", sort=True, extra_choices=(f"{TIMM_PREFIX}<any timm model>",)
)
PAPER_WIDTH = 64


def create_model(
    cfg: ModelConfig, image_size: int | None = None, num_classes: int = NUM_CLASSES
) -> nn.Module:
    """Build the model `cfg` names with `num_classes` outputs; with `image_size`, check it can
    take images that small. A model whose builder takes the size needs `image_size`."""
    if not cfg.name.startswith(TIMM_PREFIX):
        MODELS.get(cfg.name)  # an unknown name is the first thing to say, before its options
    if cfg.width != PAPER_WIDTH and not _in_family(cfg.name):
        raise UserError(
            f"model.width applies to {family_names()} only: drop it for model {cfg.name}"
        )
    check_family_options(cfg)
    model = _build(cfg, image_size)
    if cfg.head != "linear" or num_classes != NUM_CLASSES:
        # Builders make 2-class linear classifiers; only other heads pay for a new layer, so
        # the default model's initial weights stay what a seed gave them before.
        replace_classifier(model, cfg.head, cfg.norm, cfg.head_dropout, num_classes, cfg.gn_groups)
    if cfg.drop_connect > 0:
        parent, attr = classifier_layer(model, num_classes)
        linear = getattr(parent, attr)
        setattr(parent, attr, DropConnectLinear.from_linear(linear, cfg.drop_connect))
    if cfg.mixstyle > 0:  # hooks, not layers: the state dict keeps its keys
        attach_mixstyle(model, cfg.mixstyle, cfg.mixstyle_alpha)
    if cfg.pretrained:
        load_pretrained(model, cfg.pretrained)
    if image_size is not None:
        check_image_size(model, cfg.name, image_size)
    return model


def _build(cfg: ModelConfig, image_size: int | None) -> nn.Module:
    """The builder's 2-class model, given the image size if its registration asks for it."""
    if cfg.name.startswith(TIMM_PREFIX):
        return _create_timm(cfg)
    build = MODELS.get(cfg.name)
    # The tag, not the signature, says which builders take the size: the casts follow it.
    if cfg.name not in MODELS.names(takes_size=True):
        return cast(Builder, build)(cfg)
    if image_size is None:
        raise UserError(
            f"model {cfg.name} shapes its layers to the image size, and none was given: "
            f"set data.image_size (image_size= when building it from Python)"
        )
    return cast(SizedBuilder, build)(cfg, image_size)


def _in_family(name: str) -> bool:
    return name in MODELS.names(takes_width=True)


def family_names() -> str:
    """Our ResNet family, for error messages."""
    return "the ResNet family (" + ", ".join(MODELS.names(takes_width=True)) + ")"


def check_family_options(cfg: ModelConfig) -> None:
    """Activation, attention, batch renormalisation and DropBlock are options of our ResNet
    family."""
    family = family_names()
    for key, value, default in (
        ("activation", cfg.activation, "relu"),
        ("attention", cfg.attention, "auto"),
        ("block_drop_rate", cfg.block_drop_rate, 0.0),
    ):
        if value != default and not _in_family(cfg.name):
            raise UserError(f"model.{key} applies to {family} only: drop it for {cfg.name}")
    if cfg.norm == "brn" and not _in_family(cfg.name):
        raise UserError(f"model.norm brn applies to {family} only: use bn or gn for {cfg.name}")


def _create_timm(cfg: ModelConfig) -> nn.Module:
    import timm

    arch = cfg.name.removeprefix(TIMM_PREFIX)
    if not timm.is_model(arch):
        raise UserError(f"unknown timm model {arch!r} in model.name: see timm.list_models()")
    # pretrained=False: weights only ever come from a local file (model.pretrained).
    return timm.create_model(
        arch, pretrained=False, in_chans=IN_CHANS, num_classes=NUM_CLASSES, drop_rate=cfg.drop_rate
    )


def check_image_size(
    model: nn.Module, name: str, image_size: int, key: str = "data.image_size"
) -> None:
    """Fail with a clear message, naming the config `key`, if a forward pass at `image_size`
    is impossible. A model built on the meta device is checked without computing anything."""
    was_training = model.training
    device = next(model.parameters(), torch.zeros(0)).device
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, IN_CHANS, image_size, image_size, device=device))
    except (RuntimeError, MemoryError) as err:
        # An operation without a meta kernel says nothing of the size: the real build checks.
        if not (device.type == "meta" and isinstance(err, NotImplementedError)):
            raise UserError(_size_refusal(key, image_size, name, err)) from None
    finally:
        model.train(was_training)


def _size_refusal(key: str, image_size: int, name: str, err: BaseException) -> str:
    """Why a forward pass at `image_size` failed: the model's shapes, or the memory."""
    if isinstance(err, MemoryError) or "allocate" in str(err):
        return (
            f"{key} {image_size} is too large for model {name}: one image at that size needs "
            f"more memory than is free; use a smaller size"
        )
    return (
        f"{key} {image_size} is too small for model {name}: use a larger size "
        f"({first_line(err, 80)})"
    )


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
