"""MixStyle (Zhou, Yang, Qiao, Xiang, "Domain Generalization with MixStyle", ICLR 2021): in
training, the channel statistics (mean, std over H, W) of each image's feature maps after the
first residual stages are mixed with another image's of the same batch, so the network sees
new "styles" (contrast, texture statistics of a scanner or site) without extra data.

`attach_mixstyle` puts it on a model as forward hooks on `layer1` and `layer2` (timm's ResNet
names, as the paper: after res1 and res2). It holds no parameters and no buffers, so the
state dict (checkpoints, federated updates) keeps its keys; in eval mode the hooks change
nothing, so evaluation and prediction, which rebuild them from the recipe, are unaffected.
It mixes the images of a batch, so DP-SGD refuses it (`privacy.check_privacy`).
"""

from __future__ import annotations

import torch
from torch import nn

from pneumonia.core.errors import UserError

STAGES = ("layer1", "layer2")
EPS = 1e-6  # the paper's, added to the variance


def mixstyle(
    x: torch.Tensor,
    alpha: float,
    perm: torch.Tensor | None = None,
    lam: torch.Tensor | None = None,
) -> torch.Tensor:
    """Features [B, C, H, W] with each instance's channel statistics mixed with those of
    instance perm[b] (random permutation unless given) by lam[b] ~ Beta(alpha, alpha) (unless
    given): sigma_mix (x - mu) / sigma + mu_mix. Statistics are detached (the paper's) and
    computed in float32 whatever the autocast dtype."""
    b = x.shape[0]
    if perm is None:
        perm = torch.randperm(b)
    if lam is None:
        lam = torch.distributions.Beta(alpha, alpha).sample((b,))
    feats = x.float()
    mu = feats.mean(dim=(2, 3), keepdim=True).detach()
    sigma = (feats.var(dim=(2, 3), keepdim=True) + EPS).sqrt().detach()
    lam = lam.to(device=x.device, dtype=feats.dtype).view(b, 1, 1, 1)
    perm = perm.to(x.device)
    mu_mix = lam * mu + (1 - lam) * mu[perm]
    sigma_mix = lam * sigma + (1 - lam) * sigma[perm]
    return (sigma_mix * (feats - mu) / sigma + mu_mix).to(x.dtype)


class MixStyle(nn.Module):
    """MixStyle with probability `p` per batch, in training mode only; no parameters."""

    def __init__(self, p: float = 0.5, alpha: float = 0.1) -> None:
        super().__init__()
        self.p = p
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Drawn on the CPU from torch's global RNG: seeded with the run, no device sync.
        if not self.training or x.shape[0] < 2 or torch.rand(()).item() >= self.p:
            return x
        return mixstyle(x, self.alpha)

    def hook(self, stage: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        """A forward hook on a stage: follows the stage's train/eval mode (the hook is not a
        submodule, so model.train() and model.eval() do not reach it, nor the state dict)."""
        self.train(stage.training)
        return self(output)


def attach_mixstyle(model: nn.Module, p: float, alpha: float = 0.1) -> MixStyle:
    """Hook one MixStyle after each of the model's STAGES; UserError for a model without them."""
    found = [getattr(model, name, None) for name in STAGES]
    stages = [stage for stage in found if isinstance(stage, nn.Module)]
    if len(stages) < len(STAGES):
        raise UserError(
            f"model.mixstyle needs residual stages named {' and '.join(STAGES)} (the ResNet "
            f"family, timm/resnet*): {type(model).__name__} has none; drop model.mixstyle"
        )
    mix = MixStyle(p, alpha)
    for stage in stages:
        stage.register_forward_hook(mix.hook)
    return mix
