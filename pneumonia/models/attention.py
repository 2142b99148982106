"""The ResNet family's attention blocks (`model.attention`), as timm's `attn_layer` factories.

timm's BasicBlock and Bottleneck call `attn_layer(channels)` once per block and apply the result
to the residual branch after its last norm, before the shortcut is added (the place SE-Net,
CBAM and ECA-Net all put it). Each factory here builds timm's own module:

- `se`: `SEModule`, x * sigmoid(fc2(relu(fc1(mean_hw x)))), with exactly C/r squeezed
  channels (r = `model.se_reduction`). timm rounds C/r up to a multiple of 8 by default
  (rd_divisor=8); we pass rd_divisor=1, so 64 channels at r=16 squeeze to 4, as in the paper.
- `cbam`: `CbamModule` (Woo et al. 2018): the channel gate
  x * sigmoid(MLP(mean_hw x) + MLP(max_hw x)), then the spatial gate
  x * sigmoid(norm(conv7x7([mean_c x, max_c x]))). Squeeze C/r with r = `model.se_reduction`
  and rd_divisor=1 (timm's CbamModule default too: nothing is rounded when r divides C, and
  timm's resnet50 with attn_layer "cbam" has our resnet50's count at r=16 with bn). Where
  timm differs from the paper's equations, it follows the official code: the spatial gate's
  7x7 convolution is followed by a 1-channel BatchNorm; timm's MLP has no biases (the official
  code's Linear layers have). The spatial gate's norm follows `model.norm`: timm's BatchNorm
  for bn, BatchRenorm2d for brn, and none for gn (the paper's sigmoid(f7x7([avg; max]))), so a
  gn model holds no layer that mixes the images of a batch (what DP-SGD needs). A GroupNorm on
  that one channel would normalise each image's map over H x W alone: a constant gate, and an
  error at batch size 1, on the 1x1 maps of small images.
- `eca`: `EcaModule` (Wang et al. 2020): x * sigmoid(conv1d_k(mean_hw x)), a 1-D convolution
  across channels without bias, with the paper's adaptive kernel as timm computes it:
  t = floor((log2 C + 1) / 2), k = t if odd else t + 1, at least 3 (3 below 128 channels, 5 from
  128 to 1024, 7 at 2048). It has no reduction, so `model.se_reduction` does not apply.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from timm.layers import EcaModule, SEModule
from timm.layers.cbam import CbamModule
from torch import nn

from pneumonia.core.errors import UserError
from pneumonia.models.factory import ModelConfig
from pneumonia.models.layers import BatchRenorm2d

ATTENTIONS = ("none", "se", "cbam", "eca")  # model.attention, besides auto

AttnLayer = Callable[..., nn.Module]  # timm's attn_layer: attn_layer(channels) -> module


def check_reduction(cfg: ModelConfig, stem: int | None = None) -> int:
    """`model.se_reduction`, checked to divide model.width (so every stage's C/r is whole) and,
    for a model with an attention block on the stem, the stem's `stem` channels."""
    reduction = cfg.se_reduction
    if reduction < 1 or cfg.width % reduction or (stem and stem % reduction):
        where = f"model.width {cfg.width}" + (f" and the stem's {stem} channels" if stem else "")
        raise UserError(
            f"model.se_reduction {reduction} must divide {where} (at width 64: 4, 8, 16)"
        )
    return reduction


def se_layer(cfg: ModelConfig) -> partial:
    """Squeeze-and-excitation with exactly C/r squeezed channels."""
    return partial(SEModule, rd_ratio=1.0 / check_reduction(cfg), rd_divisor=1)


def spatial_norm(cfg: ModelConfig) -> Callable[[], nn.Module] | None:
    """The norm after CBAM's 7x7 spatial convolution (1 channel); None keeps timm's BatchNorm."""
    if cfg.norm == "gn":
        return nn.Identity
    if cfg.norm == "brn":
        return partial(
            BatchRenorm2d,
            1,
            r_max=cfg.brn_r_max,
            d_max=cfg.brn_d_max,
            warmup_steps=cfg.brn_warmup,
        )
    return None


def cbam_layer(cfg: ModelConfig, stem: int | None = None) -> AttnLayer:
    """CBAM with exactly C/r channels in its channel gate's MLP and `model.norm` in its spatial
    gate (`stem`: the model also puts one on the stem's channels, checked too)."""
    reduction = check_reduction(cfg, stem)
    norm = spatial_norm(cfg)

    def make(channels: int, **kwargs) -> CbamModule:
        module = CbamModule(channels, rd_ratio=1.0 / reduction, rd_divisor=1, **kwargs)
        if norm is not None:
            module.spatial.conv.bn = norm()
        return module

    return make


def attention_layer(cfg: ModelConfig, default: str) -> AttnLayer | None:
    """timm's `attn_layer` for `model.attention` (auto: `default`, the one the model's name
    says); None for no attention."""
    kind = default if cfg.attention == "auto" else cfg.attention
    if kind not in ATTENTIONS:
        raise UserError(
            f"unknown model.attention {cfg.attention!r}: choose auto, {', '.join(ATTENTIONS)}"
        )
    if kind == "se":
        return se_layer(cfg)
    if kind == "cbam":
        return cbam_layer(cfg)
    if kind == "eca":
        return EcaModule  # its kernel size adapts to the channels it is built for
    return None
