"""The paper's centrally trained baselines from torchvision: AlexNet and VGG-16.

torchvision's builders take num_classes but not the input channels, so the first
convolution is swapped for a 1-channel one of the same shape otherwise.
"""

from __future__ import annotations

from torch import nn
from torchvision import models as tvm

from pneumonia.models.factory import IN_CHANS, MODELS, NUM_CLASSES, ModelConfig


def _one_channel_first_conv(features: nn.Sequential) -> None:
    conv = features[0]
    assert isinstance(conv, nn.Conv2d)  # torchvision's AlexNet and VGG start with one
    # torch types a Conv2d's kernel_size, stride and padding as tuple[int, ...] but asks for
    # pairs: these are the pairs a Conv2d was built with.
    shape = conv.kernel_size, conv.stride, conv.padding
    features[0] = nn.Conv2d(IN_CHANS, conv.out_channels, *shape)  # type: ignore[arg-type]


@MODELS.register("alexnet")
def alexnet(cfg: ModelConfig) -> nn.Module:
    """AlexNet (torchvision); `model.norm` does not apply."""
    model = tvm.alexnet(weights=None, num_classes=NUM_CLASSES, dropout=cfg.drop_rate or 0.5)
    _one_channel_first_conv(model.features)
    return model


@MODELS.register("vgg16")
def vgg16(cfg: ModelConfig) -> nn.Module:
    """VGG-16 (torchvision): with `model.norm: bn` the batch-normalised variant."""
    build = tvm.vgg16_bn if cfg.norm == "bn" else tvm.vgg16
    model = build(weights=None, num_classes=NUM_CLASSES, dropout=cfg.drop_rate or 0.5)
    _one_channel_first_conv(model.features)
    return model
