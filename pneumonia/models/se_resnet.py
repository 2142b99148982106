"""The ResNet family: ResNet-18, -34 and -50 with SE, CBAM, ECA or no attention, BatchNorm,
GroupNorm or batch renormalisation, built from timm's ResNet (7x7 stem of 64 filters, max
pooling, 4 stages).

What each name builds (`model.attention auto` is the attention the name says; any other value
puts that attention in every residual block instead, pneumonia.models.attention):

- `resnet18`, `resnet34`: BasicBlocks, 2-2-2-2 and 3-4-6-3 per stage; no attention.
- `resnet50`: timm's Bottleneck (1x1, 3x3, 1x1 expanding 4x), 3-4-6-3; no attention.
- `se_resnet18`, `se_resnet34`, `se_resnet50`: the same with an SE block in every residual
  block. `se_resnet18` with `model.norm gn` is the paper's FL-SE-ResNet-GN: ResNet-18, SE
  (reduction r) on each residual branch before the addition, GroupNorm with G groups in place
  of BatchNorm.
- `thesis_cbam_resnet50`: the thesis's CBAM-ResNet-50: ResNet-50 whose blocks have no
  attention (unless `model.attention` says one), plus, after the stem's max pooling and before
  layer1, a 3x3 convolution keeping the stem's 64 channels with norm and activation
  (`pre_conv`, `pre_norm`, `pre_act`) and a CBAM block (`pre_cbam`), and a second CBAM block
  after layer4, before global pooling (`post_cbam`). Classifier, `layer4` (Grad-CAM's target)
  and `forward_features`/`forward_head` are timm's.

`model.width` w sets the stages' channels w, 2w, 4w, 8w (paper: 64; the Bottleneck's outputs
are 4x those); the stem stays at 64 filters whatever w is (timm). timm's blocks apply their
attention after the last norm of the residual branch and before the shortcut is added, exactly
where the SE, CBAM and ECA papers put it. Two timm defaults differ from the paper and are
overridden here: GroupNorm's 32 groups (we pass G = `model.gn_groups`) and SEModule's rounding
of the squeezed width up to a multiple of 8 (rd_divisor=1 keeps C/r, so 64 channels at r=16
squeeze to 4, not 8). CBAM squeezes to C/r as well (rd_divisor=1, timm's CbamModule default:
no rounding, r = `model.se_reduction` divides every width); how timm's CBAM and ECA differ from
their papers is in pneumonia.models.attention.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import GroupNorm
from timm.models import checkpoint_seq
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from pneumonia.core.errors import UserError
from pneumonia.models.attention import AttnLayer, attention_layer, cbam_layer
from pneumonia.models.factory import IN_CHANS, MODELS, NUM_CLASSES, ModelConfig
from pneumonia.models.layers import BatchRenorm2d, activation_layer

STEM_CHANNELS = 64  # timm's 7x7 stem, whatever model.width is
DEPTHS = {  # depth: (block, blocks per stage)
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
}


def stage_channels(width: int) -> tuple[int, ...]:
    """The four stage widths: `width` (64 in the paper), doubling at every stage (a Bottleneck
    stage outputs 4x its width).

    Narrow widths are for quick tests and smoke runs; the stem stays at 64 filters (timm).
    """
    if width < 1:
        raise UserError(f"model.width {width} must be a positive number of channels (paper: 64)")
    return tuple(width * 2**i for i in range(4))


def norm_layer(cfg: ModelConfig) -> type[nn.Module] | partial:
    """BatchNorm2d, batch renormalisation, or GroupNorm with cfg.gn_groups groups (checked to
    divide every width)."""
    if cfg.norm == "bn":
        return nn.BatchNorm2d
    if cfg.norm == "brn":
        return partial(
            BatchRenorm2d, r_max=cfg.brn_r_max, d_max=cfg.brn_d_max, warmup_steps=cfg.brn_warmup
        )
    if cfg.gn_groups < 1 or cfg.width % cfg.gn_groups or STEM_CHANNELS % cfg.gn_groups:
        raise UserError(
            f"model.gn_groups {cfg.gn_groups} must divide model.width {cfg.width} and the "
            "stem's 64 channels (at width 64: 1, 2, 4, 8, 16, 32)"
        )
    return partial(GroupNorm, num_groups=cfg.gn_groups)


def resnet_args(cfg: ModelConfig, depth: int, attn_layer: AttnLayer | None) -> dict:
    """timm ResNet's arguments for the family member of `depth` with `attn_layer` in every
    block."""
    block, layers = DEPTHS[depth]
    return {
        "block": block,
        "layers": layers,
        "channels": stage_channels(cfg.width),  # the 7x7 stem stays at 64 filters (timm)
        "in_chans": IN_CHANS,
        "num_classes": NUM_CLASSES,
        "norm_layer": norm_layer(cfg),
        "act_layer": activation_layer(
            cfg.activation, cfg.maxout_pieces, cfg.noisy_softplus_k, cfg.noisy_softplus_sigma
        ),
        "drop_rate": cfg.drop_rate,
        "drop_block_rate": cfg.block_drop_rate,
        "block_args": {"attn_layer": attn_layer} if attn_layer else None,
    }


def resnet(cfg: ModelConfig, depth: int, attention: str) -> ResNet:
    """ResNet-`depth` with `attention` in every block unless `model.attention` says another."""
    attn_layer = attention_layer(cfg, attention)  # first: its errors come before the norm's
    return ResNet(**resnet_args(cfg, depth, attn_layer))


class ThesisCbamResNet(ResNet):
    """timm's ResNet with a 3x3 conv + norm + activation and a CBAM block between the stem's
    max pooling and layer1 (`pre_conv`, `pre_norm`, `pre_act`, `pre_cbam`) and a CBAM block
    between layer4 and global pooling (`post_cbam`)."""

    # timm adds its stages by name (add_module): their types, for the type checker.
    layer1: nn.Module
    layer2: nn.Module
    layer3: nn.Module
    layer4: nn.Module

    def __init__(self, cbam: AttnLayer, **resnet_kwargs):
        super().__init__(**resnet_kwargs)
        stem_conv = self.conv1
        assert isinstance(stem_conv, nn.Conv2d)  # timm's 7x7 stem: resnet_args asks no deep one
        stem = stem_conv.out_channels
        self.pre_conv = nn.Conv2d(stem, stem, kernel_size=3, stride=1, padding=1, bias=False)
        self.pre_norm = resnet_kwargs["norm_layer"](stem)
        self.pre_act = resnet_kwargs["act_layer"](inplace=True)
        self.pre_cbam = cbam(stem)
        self.post_cbam = cbam(self.num_features)
        for module in (self.pre_conv, self.pre_cbam, self.post_cbam):
            for conv in module.modules():  # as timm's init_weights does for every other conv
                if isinstance(conv, nn.Conv2d):
                    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.pre_cbam(self.pre_act(self.pre_norm(self.pre_conv(x))))
        stages = [self.layer1, self.layer2, self.layer3, self.layer4]
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(stages, x, flatten=True)
        else:
            for stage in stages:
                x = stage(x)
        return self.post_cbam(x)

    def forward_intermediates(self, *args, **kwargs):
        # timm's version would skip pre_* and post_cbam and return wrong features silently.
        raise NotImplementedError("thesis_cbam_resnet50 has no forward_intermediates")


def _register_family() -> None:
    """resnet18/34/50 (no attention unless model.attention says) and se_resnet18/34/50 (SE
    unless it says another); se_resnet18 with model.norm gn is FL-SE-ResNet-GN's backbone."""
    for depth in DEPTHS:
        for prefix, attention in (("resnet", "none"), ("se_resnet", "se")):

            def build(cfg: ModelConfig, depth: int = depth, attention: str = attention) -> ResNet:
                return resnet(cfg, depth, attention)

            build.__doc__ = f"{prefix}{depth}: ResNet-{depth} with {attention} attention."
            MODELS.register(f"{prefix}{depth}", takes_width=True)(build)


_register_family()


@MODELS.register("thesis_cbam_resnet50", takes_width=True)
def thesis_cbam_resnet50(cfg: ModelConfig) -> ThesisCbamResNet:
    """The thesis's CBAM-ResNet-50: CBAM after the stem (behind a 3x3 conv) and after layer4."""
    attn_layer = attention_layer(cfg, "none")
    cbam = cbam_layer(cfg, stem=STEM_CHANNELS)
    return ThesisCbamResNet(cbam, **resnet_args(cfg, 50, attn_layer))
