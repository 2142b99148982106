"""The paper's centrally trained baselines from torchvision: AlexNet and VGG-16.

torchvision's builders take num_classes but not the input channels, so the first
convolution is swapped for a 1-channel one of the same shape otherwise.
"""

from __future__ import annotations

from torch import nn
from torchvision import models as tvm

from pneumonia.models.factory import IN_CHANS, NUM_CLASSES, ModelConfig, register


def _one_channel_first_conv(features: nn.Sequential) -> None:
    conv = features[0]
    features[0] = nn.Conv2d(
        IN_CHANS, conv.out_channels, conv.kernel_size, conv.stride, conv.padding
    )


@register("alexnet")
def alexnet(cfg: ModelConfig) -> nn.Module:
    """AlexNet (torchvision); `model.norm` does not apply."""
    model = tvm.alexnet(weights=None, num_classes=NUM_CLASSES, dropout=cfg.drop_rate or 0.5)
    _one_channel_first_conv(model.features)
    return model


@register("vgg16")
def vgg16(cfg: ModelConfig) -> nn.Module:
    """VGG-16 (torchvision): with `model.norm: bn` the batch-normalised variant."""
    build = tvm.vgg16_bn if cfg.norm == "bn" else tvm.vgg16
    model = build(weights=None, num_classes=NUM_CLASSES, dropout=cfg.drop_rate or 0.5)
    _one_channel_first_conv(model.features)
    return model
