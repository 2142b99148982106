"""Optional layers the models can be built with: activations by name, Batch Renormalization
and DropConnect.

- Activations: `model.activation` picks one from `ACTIVATIONS`, whose factories take
  `inplace` and the activation options (`maxout_pieces`, `noisy_softplus_k`,
  `noisy_softplus_sigma`) as keywords, ignoring those they have no use for.
  `activation_layer` turns the name into timm's `act_layer`, a factory that timm's blocks call
  as `act_layer(inplace=True)` once per activation, so each call builds a fresh module (a
  PReLU slope per layer). Two are not in torch and are written here: Noisy Softplus (Liu and
  Furber 2016) and a channel maxout that keeps the width (Goodfellow et al. 2013).
- `BatchRenorm2d` (Ioffe 2017): no library ships it for torch. It subclasses BatchNorm2d, so
  its parameters and buffers have BatchNorm's names and shapes and everything that looks for
  BatchNorm (FedBN's local keys, the privacy check that refuses batch-mixing layers) finds it.
- `DropConnectLinear` (Wan et al. 2013): a Linear whose weights are dropped in training.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from pneumonia.core.errors import UserError
from pneumonia.core.registry import Registry

ActivationFactory = Callable[..., nn.Module]
# BatchRenorm2d's warm-up progress: a tensor during the warm-up, 1.0 without one.
Progress = TypeVar("Progress", torch.Tensor, float)
ACTIVATIONS: Registry[ActivationFactory] = Registry("model.activation")


class NoisySoftplus(nn.Module):
    """Noisy Softplus (Liu and Furber 2016): f(x) = k * sigma * log(1 + exp(x / (k * sigma))).

    It models the mean firing rate of a spiking neuron whose input carries noise: `sigma` is
    the noise level of the input (a fixed hyper-parameter here, not measured), `k` a constant
    of the neuron model. With k * sigma = 1 it is the plain softplus; smaller products bend it
    closer to ReLU.
    """

    def __init__(self, k: float = 0.5, sigma: float = 1.0):
        super().__init__()
        for key, value in (("k", k), ("sigma", sigma)):
            if not value > 0:
                raise UserError(f"model.noisy_softplus_{key} {value} must be positive")
        self.k = k
        self.sigma = sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # softplus(x, beta) = log(1 + exp(beta * x)) / beta, computed without overflow.
        return F.softplus(x, beta=1.0 / (self.k * self.sigma))

    def extra_repr(self) -> str:
        return f"k={self.k}, sigma={self.sigma}"


class Maxout(nn.Module):
    """Channel maxout with `pieces` pieces that keeps the width: output channel c is the max of
    input channels c, c + 1, ..., c + pieces - 1 (mod C).

    Goodfellow et al.'s maxout takes the max over k linear pieces, grouping k channels of the
    preceding linear layer into one output, which divides the width by k. Sliding the window
    one channel at a time instead of k keeps C channels, so it drops into any block in place
    of ReLU. Parameter-free; works on [B, C, ...] ([B, C, H, W] or [B, C]).
    """

    def __init__(self, pieces: int = 2):
        super().__init__()
        if pieces < 2:
            raise UserError(f"model.maxout_pieces {pieces} must be at least 2")
        self.pieces = pieces

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for j in range(1, self.pieces):
            # roll by -j puts channel (c + j) mod C at position c.
            out = torch.maximum(out, torch.roll(x, shifts=-j, dims=1))
        return out

    def extra_repr(self) -> str:
        return f"pieces={self.pieces}"


# Only ReLU honours `inplace`: it is the default, where the memory saving matters, and the
# one timm's blocks are known to be safe with; the others run out of place.
@ACTIVATIONS.register("relu")
def _relu(inplace: bool = False, **_options) -> nn.Module:
    return nn.ReLU(inplace=inplace)


@ACTIVATIONS.register("sigmoid")
def _sigmoid(inplace: bool = False, **_options) -> nn.Module:
    return nn.Sigmoid()


@ACTIVATIONS.register("tanh")
def _tanh(inplace: bool = False, **_options) -> nn.Module:
    return nn.Tanh()


@ACTIVATIONS.register("prelu")
def _prelu(inplace: bool = False, **_options) -> nn.Module:
    return nn.PReLU()  # one shared slope per layer, initialised at 0.25


@ACTIVATIONS.register("rrelu")
def _rrelu(inplace: bool = False, **_options) -> nn.Module:
    return nn.RReLU()  # slopes drawn in [1/8, 1/3] in training, their mean in eval


@ACTIVATIONS.register("elu")
def _elu(inplace: bool = False, **_options) -> nn.Module:
    return nn.ELU()


@ACTIVATIONS.register("softplus")
def _softplus(inplace: bool = False, **_options) -> nn.Module:
    return nn.Softplus()


@ACTIVATIONS.register("noisy_softplus")
def _noisy_softplus(
    inplace: bool = False,
    noisy_softplus_k: float = 0.5,
    noisy_softplus_sigma: float = 1.0,
    **_options,
) -> nn.Module:
    return NoisySoftplus(noisy_softplus_k, noisy_softplus_sigma)


@ACTIVATIONS.register("maxout")
def _maxout(inplace: bool = False, maxout_pieces: int = 2, **_options) -> nn.Module:
    return Maxout(maxout_pieces)


ACTIVATION_NAMES = ACTIVATIONS.names()  # model.activation's choices, in registration order


def activation_layer(
    name: str,
    maxout_pieces: int = 2,
    noisy_softplus_k: float = 0.5,
    noisy_softplus_sigma: float = 1.0,
) -> ActivationFactory:
    """timm's `act_layer` for `model.activation name`: call it (with `inplace`) for a new module."""
    factory = partial(
        ACTIVATIONS.get(name),
        maxout_pieces=maxout_pieces,
        noisy_softplus_k=noisy_softplus_k,
        noisy_softplus_sigma=noisy_softplus_sigma,
    )
    factory()  # build one now, so a bad option fails here and not halfway through a model
    return factory


class BatchRenorm2d(nn.BatchNorm2d):
    """Batch Renormalization (Ioffe 2017) over [N, C, H, W].

    In training, per channel, with the batch statistics over (N, H, W), mu_B and
    sigma_B = sqrt(var_B + eps) (biased variance), and sigma = sqrt(running_var + eps):

        r = clip(sigma_B / sigma, 1 / r_max, r_max)            (no gradient)
        d = clip((mu_B - running_mean) / sigma, -d_max, d_max)  (no gradient)
        y = weight * ((x - mu_B) / sigma_B * r + d) + bias

    then, as BatchNorm does, running_mean += momentum * (mu_B - running_mean) and
    running_var += momentum * (unbiased var_B - running_var). With r_max = 1 and d_max = 0 it
    is BatchNorm2d exactly (outputs, gradients, running statistics). r and d pull the
    training output towards what eval will compute, so small or non-i.i.d. batches train a
    network that behaves the same in eval. In eval: weight * (x - running_mean) / sigma + bias.

    Warm-up: with `warmup_steps` W > 0 the limits grow linearly with the batches seen so far,
    t = num_batches_tracked: r_max_t = 1 + (r_max - 1) * min(t / W, 1) and
    d_max_t = d_max * min(t / W, 1). It starts as BatchNorm, while the running statistics are
    still poor, and relaxes to the full limits after W batches, as the paper does.

    In a federation: running_mean and running_var are float buffers that FedAvg averages like
    BatchNorm's (FedBN keeps them local with the other normalisation keys); num_batches_tracked
    is an integer counter that only drives the warm-up.
    """

    # Always tracked, with a momentum (BatchNorm's types allow neither to be None).
    running_mean: torch.Tensor
    running_var: torch.Tensor
    num_batches_tracked: torch.Tensor
    momentum: float

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 0,
        device=None,
        dtype=None,
    ):
        if not r_max >= 1:
            raise UserError(f"model.brn_r_max {r_max} must be at least 1 (1 with d_max 0 is BN)")
        if not d_max >= 0:
            raise UserError(f"model.brn_d_max {d_max} must be at least 0 (0 with r_max 1 is BN)")
        if warmup_steps < 0:
            raise UserError(f"model.brn_warmup {warmup_steps} must be at least 0")
        super().__init__(num_features, eps=eps, momentum=momentum, device=device, dtype=dtype)
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.warmup_steps = warmup_steps

    def _progress(self) -> torch.Tensor | float:
        """min(t / W, 1), kept a tensor so training never waits on the GPU for the count."""
        if self.warmup_steps == 0:
            return 1.0
        return (self.num_batches_tracked.float() / self.warmup_steps).clamp(max=1.0)

    def limits(self) -> tuple[float, float]:
        """(r_max_t, d_max_t): the clip limits the next training batch gets."""
        progress = float(self._progress())
        return 1.0 + (self.r_max - 1.0) * progress, self.d_max * progress

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training:
            return self._affine(x.float(), self.running_mean, self.running_var).to(x.dtype)
        return self._train_forward(x)

    def _affine(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        x_hat = (x - _channel(mean)) * _channel(torch.rsqrt(var.float() + self.eps))
        return x_hat * _channel(self.weight) + _channel(self.bias)

    def _train_forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.numel() // x.shape[1]
        if n < 2:
            raise ValueError(
                f"BatchRenorm2d expects more than 1 value per channel when training, got {n}"
            )
        x32 = x.float()  # statistics in float32, whatever the autocast dtype
        var_b, mu_b = torch.var_mean(x32, dim=(0, 2, 3), correction=0)
        sigma_b = torch.sqrt(var_b + self.eps)
        with torch.no_grad():
            r, d = self._r_d(mu_b, sigma_b)
        x_hat = (x32 - _channel(mu_b)) / _channel(sigma_b) * _channel(r) + _channel(d)
        y = x_hat * _channel(self.weight) + _channel(self.bias)
        self._update_running(mu_b.detach(), var_b.detach(), n)
        return y.to(x.dtype)

    def _r_d(self, mu_b: torch.Tensor, sigma_b: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """r and d of the docstring, clipped to this step's limits (warm-up included)."""
        sigma = torch.sqrt(self.running_var.float() + self.eps)
        ratio, shift = sigma_b / sigma, (mu_b - self.running_mean.float()) / sigma
        progress = self._progress()
        # One call each way: the checker then sees both limits tensors, or both floats.
        if isinstance(progress, torch.Tensor):
            return self._clip(ratio, shift, progress)
        return self._clip(ratio, shift, progress)

    def _clip(
        self, ratio: torch.Tensor, shift: torch.Tensor, progress: Progress
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ratio to [1 / r_max_t, r_max_t], shift to [-d_max_t, d_max_t]: limits that are
        tensors or floats as `progress` is (torch.clamp takes either, never one of each)."""
        r_max = 1.0 + (self.r_max - 1.0) * progress
        d_max = self.d_max * progress
        return torch.clamp(ratio, 1.0 / r_max, r_max), torch.clamp(shift, -d_max, d_max)

    @torch.no_grad()
    def _update_running(self, mu_b: torch.Tensor, var_b: torch.Tensor, n: int) -> None:
        # The unbiased variance, as BatchNorm2d stores it, so r_max 1 / d_max 0 is BN exactly.
        unbiased = var_b * (n / (n - 1))
        self.running_mean.lerp_(mu_b.to(self.running_mean.dtype), self.momentum)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)
        self.num_batches_tracked.add_(1)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, "
            f"warmup_steps={self.warmup_steps}"
        )


def _channel(v: torch.Tensor) -> torch.Tensor:
    """A per-channel vector shaped to broadcast over [N, C, H, W]."""
    return v.reshape(1, -1, 1, 1)


class DropConnectLinear(nn.Linear):
    """A Linear with DropConnect (Wan et al. 2013): in training every weight is dropped with
    probability `p`, one mask per forward pass shared by the whole batch, and the survivors
    are scaled by 1 / (1 - p) so the expected weight is the weight; the bias is never dropped.
    In eval it is the plain Linear. Its parameters are a Linear's (`weight`, `bias`), so the
    state dicts load into each other.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        p: float = 0.5,
        device=None,
        dtype=None,
    ):
        if not 0.0 <= p < 1.0:
            raise UserError(f"model.drop_connect {p} must be in [0, 1) (0 turns it off)")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.p = p

    @classmethod
    def from_linear(cls, linear: nn.Linear, p: float) -> DropConnectLinear:
        """A DropConnectLinear with `linear`'s weights (copied), for swapping into a model."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            p=p,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        layer.load_state_dict(linear.state_dict())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return super().forward(x)
        keep = torch.rand_like(self.weight) >= self.p
        weight = self.weight * keep / (1.0 - self.p)
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}"
