"""Small models made for DP-SGD (`privacy.enabled`), where an end-to-end ResNet learns little:
Tramèr & Boneh (ICLR 2021) train a linear model or a small CNN on fixed scattering features
(`pneumonia.models.scattering`, J=2, L=8: 81 channels at 1/4 of the image side), and a small
convnet with weight-standardised convolutions and GroupNorm is the end-to-end baseline.

  scatter_linear  scattering -> GroupNorm(27, 81) without affine -> Linear on the whole map
  scatter_cnn     scattering -> GroupNorm(27, 81) without affine -> three 3x3 convolutions with
                  GroupNorm and tanh -> global average pool -> Linear
  wsgn_cnn        four stages of weight-standardised 3x3 convolutions with GroupNorm and tanh
                  (1/1, 1/2, 1/4, 1/8 of the side) -> global average pool -> Linear

Every model takes 1-channel images and returns 2 logits, and none has BatchNorm. The scattering
filters are rebuilt for the image size on the first forward pass and never saved.
scatter_linear's builder takes the image size (`takes_size`, pneumonia.models.factory): its
Linear reads every position of the 81 x S/4 x S/4 map, as Tramèr & Boneh's does (20,736 features
a class at 64 px), so it takes images of that size only; the recipe that rebuilds it from a
checkpoint carries the size. Sides must be multiples of 4 for the scattering models.
Both scattering models split into `fixed_front()` (the scattering and its normalisation: no
weights, the same for every run) and `head()`: where the images do not change between epochs
(validation; training without augmentation) the front end runs once per image
(pneumonia.training.module.ClassifierModule.fixed_features).
`model.norm` must stay gn; `model.gn_groups` sets the groups of the convolutions' GroupNorms
(not the scattering's, fixed at Tramèr's 27), and `model.drop_rate` is dropout before the Linear.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pneumonia.core.errors import UserError
from pneumonia.models.factory import IN_CHANS, MODELS, NUM_CLASSES, ModelConfig
from pneumonia.models.scattering import Scattering2D

J, L = 2, 8  # Tramèr & Boneh's scattering: two scales, eight angles, order 2
SCATTER_GROUPS = 27  # their GroupNorm on the 81 scattering channels
EPS = 1e-6  # weight standardisation's epsilon (timm's StdConv2d)


def _check_norm(cfg: ModelConfig) -> None:
    if cfg.norm != "gn":
        raise UserError(
            f"model.norm {cfg.norm}: model {cfg.name} is made for DP-SGD and uses GroupNorm "
            f"only: drop model.norm (or set it to gn)"
        )


def _group_norm(groups: int, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels)


class ScatterFeatures(nn.Module):
    """Scattering of 1-channel images, each image's 81 channels normalised in 27 groups with no
    learned scale or shift (Tramèr & Boneh): [B, 1, S, S] -> [B, 81, S/4, S/4]."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name  # for the size refusal
        self.scattering = Scattering2D(J, L)
        self.norm = nn.GroupNorm(
            SCATTER_GROUPS, self.scattering.out_channels(IN_CHANS), affine=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = 2**J
        if x.shape[-1] % side or x.shape[-2] % side:
            raise UserError(
                f"data.image_size {x.shape[-1]}: model {self.name} scatters at {side}x coarser "
                f"resolution and needs a multiple of {side}: use e.g. "
                f"{max(side, x.shape[-1] // side * side)}"
            )
        return self.norm(self.scattering(x))


class ScatterLinear(nn.Module):
    """Linear model on scattering features (module docstring)."""

    def __init__(self, cfg: ModelConfig, image_size: int) -> None:
        super().__init__()
        self.features = ScatterFeatures(cfg.name)
        self.image_size = image_size  # for the size refusal
        self.drop = nn.Dropout(cfg.drop_rate)
        channels = self.features.scattering.out_channels(IN_CHANS)
        side = image_size // 2**J  # a side not a multiple of 4 is refused on the first forward
        self.fc = nn.Linear(channels * side * side, NUM_CLASSES)
        # Read by pneumonia.inference.explain.target_layer: nothing here for Grad-CAM to read.
        self.gradcam_refusal = (
            f"Grad-CAM cannot explain model {cfg.name} (a linear model on fixed scattering "
            f"features has no convolution to read): score it without heatmaps"
        )

    def fixed_front(self) -> nn.Module:
        return self.features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        side = features.shape[-1] * 2**J
        if side != self.image_size:
            raise UserError(
                f"data.image_size {side}: model {self.features.name} was built for "
                f"{self.image_size} px images (its Linear reads every position): give images "
                f"of that size"
            )
        return self.fc(self.drop(features.flatten(1)))


def _conv_block(conv: nn.Conv2d, groups: int) -> list[nn.Module]:
    return [conv, _group_norm(groups, conv.out_channels), nn.Tanh()]


class ScatterCNN(nn.Module):
    """Small CNN on scattering features (module docstring; Tramèr & Boneh's ScatterNet CNN)."""

    WIDTHS = (64, 64, 128)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.features = ScatterFeatures(cfg.name)
        a, b, c = self.WIDTHS
        groups = cfg.gn_groups
        channels = self.features.scattering.out_channels(IN_CHANS)
        self.body = nn.Sequential(
            *_conv_block(nn.Conv2d(channels, a, 3, padding=1), groups),
            *_conv_block(nn.Conv2d(a, b, 3, padding=1), groups),
            nn.MaxPool2d(2),
            *_conv_block(nn.Conv2d(b, c, 3, padding=1), groups),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(cfg.drop_rate)
        self.fc = nn.Linear(c, NUM_CLASSES)

    def fixed_front(self) -> nn.Module:
        return self.features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.pool(self.body(features)).flatten(1)))


class WSConv2d(nn.Conv2d):
    """A convolution whose weight is standardised per output channel (zero mean, unit variance
    over its inputs and kernel, as timm's StdConv2d) before every use: Qiao et al. 2019, with
    GroupNorm the batch-independent stand-in for BatchNorm that DP-SGD needs. Written with
    plain tensor operations so that Opacus's per-sample gradients go through it."""

    def standardised_weight(self) -> torch.Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
        return (w - mean) / torch.sqrt(var + EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardised_weight(), self.bias)


class WSGNCNN(nn.Module):
    """Small end-to-end convnet (module docstring): a stem at full resolution, then three
    stages that halve the side, each two weight-standardised convolutions."""

    STEM, WIDTHS = 16, (32, 64, 128)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        groups = cfg.gn_groups
        layers = _conv_block(WSConv2d(IN_CHANS, self.STEM, 3, padding=1), groups)
        before = self.STEM
        for width in self.WIDTHS:
            layers += _conv_block(WSConv2d(before, width, 3, stride=2, padding=1), groups)
            layers += _conv_block(WSConv2d(width, width, 3, padding=1), groups)
            before = width
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(cfg.drop_rate)
        self.fc = nn.Linear(before, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.pool(self.body(x)).flatten(1)))


@MODELS.register("scatter_linear", takes_size=True)
def scatter_linear(cfg: ModelConfig, image_size: int) -> nn.Module:
    """Linear model on fixed scattering features (Tramèr & Boneh 2021), for `image_size` px."""
    _check_norm(cfg)
    return ScatterLinear(cfg, image_size)


@MODELS.register("scatter_cnn")
def scatter_cnn(cfg: ModelConfig) -> nn.Module:
    """Small CNN on fixed scattering features (Tramèr & Boneh 2021)."""
    _check_norm(cfg)
    return ScatterCNN(cfg)


@MODELS.register("wsgn_cnn")
def wsgn_cnn(cfg: ModelConfig) -> nn.Module:
    """Small convnet with weight standardisation and GroupNorm, trained end to end."""
    _check_norm(cfg)
    return WSGNCNN(cfg)
