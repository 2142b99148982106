"""Transfer learning: which layers of a model loaded from `model.pretrained` keep training.

`model.transfer`:
  finetune   everything trains (the default; also what a model without pretrained weights does)
  freeze:K   the stem and the first K residual stages are frozen (ResNet family; K in 0..4)
  features   only the head trains: every layer but the classifier (the thesis's second stage:
             a fixed feature extractor under a new head)
Frozen parameters get requires_grad False, so no optimizer holds them and no gradient is
computed for them; their norm layers are held in eval mode (`FrozenLayers.hold`), so
BatchNorm's running statistics stay what the source model learned. A federated client builds
its module from the same recipe, so the same layers are frozen in every client and its
update leaves them exactly as the server sent them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from pneumonia.core.errors import UserError

STEM = ("conv1", "bn1", "pre_conv", "pre_norm", "pre_cbam")  # the ResNet family's stem
STAGES = ("layer1", "layer2", "layer3", "layer4")
_SPEC = re.compile(r"^(finetune|features|freeze:([0-4]))$")
NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def parse_transfer(spec: str) -> tuple[str, int]:
    """("finetune", 0), ("freeze", K) or ("features", 0); a one-line error otherwise."""
    match = _SPEC.match(str(spec))
    if not match:
        raise UserError(
            f"model.transfer {spec!r}: use finetune, freeze:K (K = 0..4 stages after the stem "
            "frozen, ResNet family) or features (only the head trains)"
        )
    if match.group(2) is not None:
        return "freeze", int(match.group(2))
    return match.group(1), 0


@dataclass
class FrozenLayers:
    """What `freeze` froze: top-level module names, parameter counts, and the norm layers
    held in eval mode."""

    names: list[str] = field(default_factory=list)
    frozen_parameters: int = 0
    trainable_parameters: int = 0
    norms: list[nn.Module] = field(default_factory=list)

    def hold(self) -> None:
        """Keep frozen norms in eval mode (call after every `train()`)."""
        for norm in self.norms:
            norm.eval()

    def describe(self) -> dict:
        return {
            "frozen": self.names,
            "frozen_parameters": self.frozen_parameters,
            "trainable_parameters": self.trainable_parameters,
        }


def frozen_names(model: nn.Module, spec: str, head: nn.Module) -> list[str]:
    """The top-level children of `model` that `spec` freezes; `head` is the classifier."""
    kind, k = parse_transfer(spec)
    children = dict(model.named_children())
    if kind == "finetune":
        return []
    if kind == "features":
        return [
            name
            for name, child in children.items()
            if not _holds(child, head) and any(True for _ in child.parameters())
        ]
    if "layer1" not in children:
        raise UserError(
            f"model.transfer {spec}: freeze:K applies to the ResNet family (stem, layer1..4); "
            f"use features or finetune for {type(model).__name__}"
        )
    return [n for n in children if n in STEM or n in STAGES[:k]]


def _holds(module: nn.Module, head: nn.Module) -> bool:
    return any(m is head for m in module.modules())


def freeze(model: nn.Module, spec: str, head: nn.Module) -> FrozenLayers:
    """Freeze what `spec` says (in place) and say what was frozen."""
    names = frozen_names(model, spec, head)
    out = FrozenLayers(names=names)
    for name in names:
        child = model.get_submodule(name)
        for p in child.parameters():
            p.requires_grad_(False)
        out.norms += [m for m in child.modules() if isinstance(m, NORMS)]
    out.frozen_parameters = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    out.trainable_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return out
