"""ResNet-18 and SE-ResNet-18 with BatchNorm or GroupNorm, built from timm's ResNet.

The paper's FL-SE-ResNet-GN: ResNet-18 (7x7 stem, 64 filters, 4 stages of 2 BasicBlocks),
an SE block (reduction r) on each residual branch before the addition, and GroupNorm with G
groups in place of BatchNorm. timm's BasicBlock already applies its attention layer after the
second norm and before the shortcut is added, exactly where the paper puts SE. Two timm
defaults differ from the paper and are overridden here: GroupNorm's 32 groups (we pass G) and
SEModule's rounding of the squeezed width up to a multiple of 8 (rd_divisor=1 keeps C/r, so 64
channels at r=16 squeeze to 4, not 8).
"""

from __future__ import annotations

from functools import partial

from timm.layers import GroupNorm, SEModule
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

from pneumonia.errors import UserError
from pneumonia.models.layers import BatchRenorm2d, activation_layer
from pneumonia.models.registry import IN_CHANS, NUM_CLASSES, ModelConfig, register

STEM_CHANNELS = 64  # timm's 7x7 stem, whatever model.width is


def stage_channels(width: int) -> tuple[int, ...]:
    """ResNet-18's four stage widths: `width` (64 in the paper), doubling at every stage.

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


def se_layer(cfg: ModelConfig) -> partial:
    """Squeeze-and-excitation with exactly C/r squeezed channels."""
    reduction = cfg.se_reduction
    if reduction < 1 or cfg.width % reduction:
        raise UserError(
            f"model.se_reduction {reduction} must divide model.width {cfg.width} "
            "(at width 64: 4, 8, 16)"
        )
    return partial(SEModule, rd_ratio=1.0 / reduction, rd_divisor=1)


def _resnet18(cfg: ModelConfig, attn_layer: partial | None) -> ResNet:
    channels = stage_channels(cfg.width)
    return ResNet(
        block=BasicBlock,
        layers=(2, 2, 2, 2),
        channels=channels,  # timm keeps the 7x7 stem at 64 filters whatever the stages are
        in_chans=IN_CHANS,
        num_classes=NUM_CLASSES,
        norm_layer=norm_layer(cfg),
        act_layer=activation_layer(
            cfg.activation, cfg.maxout_pieces, cfg.noisy_softplus_k, cfg.noisy_softplus_sigma
        ),
        drop_rate=cfg.drop_rate,
        drop_block_rate=cfg.block_drop_rate,
        block_args={"attn_layer": attn_layer} if attn_layer else None,
    )


@register("se_resnet18", takes_width=True)
def se_resnet18(cfg: ModelConfig) -> ResNet:
    """SE-ResNet-18: the paper's network; `model.norm` gn gives FL-SE-ResNet-GN's backbone."""
    return _resnet18(cfg, se_layer(cfg))


@register("resnet18", takes_width=True)
def resnet18(cfg: ModelConfig) -> ResNet:
    """Plain ResNet-18 baseline, BN or GN."""
    return _resnet18(cfg, None)
