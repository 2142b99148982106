"""Learning-rate decays by name, as TensorFlow 1 defines them, as multipliers of the base rate.

The review of ResNet training choices (Zhou et al. 2020) compares TensorFlow 1's eight decays
(`tf.compat.v1.train.*_decay` and `piecewise_constant`). Each is here a pure function
`factor(t, total, cfg, seed) -> lr_t / lr` of the 0-based step `t` of a schedule `total` units
long, whatever the unit: optimizer steps, epochs or federated rounds. Pure functions need no
state to resume (a LambdaLR's `last_epoch` is all) and serve the centralized scheduler
(`optim.scheduler`) and the federated round rate (`federated.round_lr`) alike.

T below is `decay_steps` when the config sets it (> 0), else `total`: a run of fixed length
then decays over exactly its length, the natural choice when the length is known up front.

A new decay is one function decorated with `@DECAYS.register("name")`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pneumonia.core.bounds import NonNegativeFloat, NonNegativeInt, PositiveFloat
from pneumonia.core.errors import UserError
from pneumonia.core.registry import Registry


@dataclass
class DecayConfig:
    """Parameters of the decays (the `optim.decay.*` config group); each decay reads its own.

    One `decay_rate` serves three decays, whose sensible values differ: set it for the decay
    chosen. To end near 0.1 of the rate after T units: exponential 0.1 (0.1^1), natural_exp 2.3
    (exp(-2.3) = 0.100), inverse_time 9 (1 / (1 + 9)). With the default 0.1 natural_exp ends
    at 0.905 and inverse_time at 0.909.
    """

    # Every decay but piecewise and constant: units over which it decays (0: the schedule's
    # length). Polynomial, cosine and the linear cosines hold their value after T units.
    decay_steps: NonNegativeInt = 0
    decay_rate: PositiveFloat = 0.1  # exponential, inverse_time, natural_exp
    staircase: bool = False  # exponential, inverse_time, natural_exp: decay every T units
    power: PositiveFloat = 1.0  # polynomial
    end_factor: NonNegativeFloat = 0.0  # polynomial: TF's end_learning_rate / lr
    # piecewise: fractions of the schedule's length, increasing in (0, 1), and the factor
    # before the first, between each pair and after the last (one more than boundaries).
    boundaries: list[float] = field(default_factory=lambda: [0.5, 0.75])
    # piecewise: the factors on the rate, one more than boundaries (see boundaries).
    factors: list[float] = field(default_factory=lambda: [1.0, 0.1, 0.01])
    alpha: NonNegativeFloat = 0.0  # cosine: the floor; linear_cosine, noisy_linear_cosine
    beta: NonNegativeFloat = 0.001  # linear_cosine, noisy_linear_cosine
    num_periods: PositiveFloat = 0.5  # linear_cosine, noisy_linear_cosine
    initial_variance: NonNegativeFloat = 1.0  # noisy_linear_cosine
    variance_decay: NonNegativeFloat = 0.55  # noisy_linear_cosine
    # Every decay, constant too: the factor times (t + 1) / (warmup + 1) for t < warmup, so
    # the first units ramp up linearly instead of starting at full rate.
    warmup: NonNegativeInt = 0


# `decay(t, total, cfg, seed=0)`, selected by optim.scheduler or federated.round_lr (the key
# decay_factor names in a refusal).
Decay = Callable[[int, int, DecayConfig, int], float]
DECAYS: Registry[Decay] = Registry("optim.scheduler")


def check_decay(cfg: DecayConfig, group: str = "optim.decay") -> None:
    """Refuse, in one line naming the key, what the parser's range types cannot catch."""
    b = list(cfg.boundaries)
    if not all(0 < x < 1 for x in b) or any(lo >= hi for lo, hi in zip(b, b[1:], strict=False)):
        raise UserError(
            f"{group}.boundaries {b} must be fractions of the schedule increasing in (0, 1), "
            "e.g. [0.5, 0.75]"
        )
    if len(cfg.factors) != len(b) + 1:
        raise UserError(
            f"{group}.factors needs {len(b) + 1} values (one more than {group}.boundaries), "
            f"got {len(cfg.factors)}"
        )
    if any(f < 0 for f in cfg.factors):
        raise UserError(f"{group}.factors {list(cfg.factors)} must be >= 0")


def _span(total: int, cfg: DecayConfig) -> int:
    """T: decay_steps when set, else the whole schedule."""
    return cfg.decay_steps if cfg.decay_steps > 0 else total


def _progress(t: int, T: int, staircase: bool) -> float:
    """t / T, or floor(t / T) in staircase mode, as TF's exponential-family decays take it."""
    return float(t // T) if staircase else t / T


@DECAYS.register("constant")
def constant(t: int, total: int, cfg: DecayConfig, seed: int = 0) -> float:
    """No decay: 1 throughout."""
    return 1.0


@DECAYS.register("piecewise")
def piecewise(t: int, total: int, cfg: DecayConfig, seed: int = 0) -> float:
    """tf.compat.v1.train.piecewise_constant(x, boundaries, values) / lr, with boundaries as
    fractions of `total`: factors[0] for t <= b[0] * total, factors[i] for
    b[i-1] * total < t <= b[i] * total, factors[-1] for t > b[-1] * total (at a boundary the
    earlier value holds, as in TF)."""
    # t / total, not t against b * total: 29 / 100 rounds to the same double as 0.29, while
    # 0.29 * 100 = 28.999999999999996 would move the boundary a unit early.
    x = t / total
    for boundary, factor in zip(cfg.boundaries, cfg.factors, strict=False):
        if x <= boundary:
            return float(factor)
    return float(cfg.factors[-1])


@DECAYS.register("polynomial")
def polynomial(t: int, total: int, cfg: DecayConfig, seed: int = 0) -> float:
    """tf.compat.v1.train.polynomial_decay (cycle=False) / lr:
    (1 - end) * (1 - min(t, T) / T) ^ power + end, with end = end_learning_rate / lr."""
    T = _span(total, cfg)
    end = cfg.end_factor
    return (1.0 - end) * (1.0 - min(t, T) / T) ** cfg.power + end


@DECAYS.register("exponential")
def exponential(t: int, total: int, cfg: DecayConfig, seed: int = 0) -> float:
    """tf.compat.v1.train.exponential_decay / lr: decay_rate ^ (t / T), the exponent floored
    when staircase. Not clamped: it keeps decaying past T."""
    return cfg.decay_rate ** _progress(t, _span(total, cfg), cfg.staircase)


@DECAYS.register("inverse_time")
def inverse_time(t: int, total: int, cfg: DecayConfig, seed: int = 0) -> float:
    """tf.compat.v1.train.inverse_time_decay / lr: 1 / (1 + decay_rate * t / T), t / T
    floored when staircase. Not clamped."""
    return 1.0 / (1.0 + cfg.decay_rate * _progress(t, _span(total, cfg), cfg.staircase))


@DECAYS.register("natural_exp")
def natural_exp(t: int, total: int, cfg: DecayConfig, seed: int = 0) -> float:
    """tf.compat.v1.train.natural_exp_decay / lr: exp(-decay_rate * t / T), t / T floored
    when staircase. Not clamped."""
    return math.exp(-cfg.decay_rate * _progress(t, _span(total, cfg), cfg.staircase))


@DECAYS.register("cosine")
def cosine(t: int, total: int, cfg: DecayConfig, seed: int = 0) -> float:
    """tf.compat.v1.train.cosine_decay / lr: (1 - alpha) * 0.5 * (1 + cos(pi * min(t, T) / T))
    + alpha. With alpha 0 and T = total it is, bit for bit, the round schedule's
    0.5 * (1 + cos(pi * t / total)) and CosineAnnealingLR(T_max=total, eta_min=0) up to t = T."""
    T = _span(total, cfg)
    # Same operation order as 0.5 * (1 + cos(pi * t / T)), so alpha 0 changes no bit.
    half_cosine = 0.5 * (1.0 + math.cos(math.pi * min(t, T) / T))
    return (1.0 - cfg.alpha) * half_cosine + cfg.alpha


def _linear_cosine(t: int, T: int, cfg: DecayConfig, eps: float) -> float:
    """(alpha + linear + eps) * cosine + beta, as TF's two linear cosine decays share it."""
    step = min(t, T)
    linear = (T - step) / T
    cos = 0.5 * (1.0 + math.cos(math.pi * 2.0 * cfg.num_periods * step / T))
    return (cfg.alpha + linear + eps) * cos + cfg.beta


@DECAYS.register("linear_cosine")
def linear_cosine(t: int, total: int, cfg: DecayConfig, seed: int = 0) -> float:
    """tf.compat.v1.train.linear_cosine_decay / lr, with s = min(t, T):
    linear = (T - s) / T; cosine = 0.5 * (1 + cos(pi * 2 * num_periods * s / T));
    (alpha + linear) * cosine + beta. TF's defaults: alpha 0, beta 0.001, num_periods 0.5."""
    return _linear_cosine(t, _span(total, cfg), cfg, 0.0)


@DECAYS.register("noisy_linear_cosine")
def noisy_linear_cosine(t: int, total: int, cfg: DecayConfig, seed: int = 0) -> float:
    """tf.compat.v1.train.noisy_linear_cosine_decay / lr: linear_cosine with linear + eps_t,
    eps_t ~ N(0, initial_variance / (1 + s) ^ variance_decay) (a variance), s = min(t, T) as
    in TF, which clamps the step before computing the variance.

    eps_t is drawn from a generator seeded by (seed, t) alone: the same run gives the same
    noise at the same t, resumed or not, with no state to save."""
    T = _span(total, cfg)
    variance = cfg.initial_variance / (1.0 + min(t, T)) ** cfg.variance_decay
    generator = torch.Generator().manual_seed(seed * 1_000_003 + t)
    normal = torch.randn((), generator=generator, dtype=torch.float64).item()
    return _linear_cosine(t, T, cfg, math.sqrt(variance) * normal)


# The built-in names, in the review's order after "no decay" (DECAYS.names() adds later ones).
DECAY_NAMES = DECAYS.names()


def decay_factor(
    name: str,
    t: int,
    total: int,
    cfg: DecayConfig,
    seed: int = 0,
    key: str = "optim.scheduler",
) -> float:
    """lr_t / lr at unit `t` (0-based) of a `total`-unit schedule: decay `name`, warm-up
    included. `key` names the config field in the error for an unknown name."""
    decay = DECAYS.get(name, key)
    if total < 1 or t < 0:
        raise ValueError(f"a schedule needs total >= 1 and t >= 0, got total {total}, t {t}")
    if name == "piecewise":
        check_decay(cfg)
    factor = decay(t, total, cfg, seed)
    if t < cfg.warmup:
        factor *= (t + 1) / (cfg.warmup + 1)
    return factor


def lambda_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    total: int,
    cfg: DecayConfig,
    seed: int = 0,
    key: str = "optim.scheduler",
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR giving each parameter group lr * decay_factor(name, t, ...) at step t."""
    decay_factor(name, 0, total, cfg, seed, key)  # a bad name or config fails here, not later

    # A plain function, not a callable object: LambdaLR's state_dict then saves nothing of it
    # (the factor is pure in t; last_epoch is the whole state).
    def factor(t: int) -> float:
        return decay_factor(name, t, total, cfg, seed, key)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
