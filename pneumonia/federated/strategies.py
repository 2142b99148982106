"""How client updates become the next global model: the strategies, by name.

A strategy has a server half (`aggregate`, and any state of its own, saved with every round)
and says what clients do differently: which keys they keep local (`local_keys`) and which
callbacks shape their training (`client_callbacks`). It never sees data, only state dicts.

A new strategy is one class and one registry line: subclass `Strategy`, override what differs,
build it from the config in `from_config`, and decorate it with `@STRATEGIES.register("name")`;
`federated.strategy name` then selects it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from pneumonia.core.registry import Registry
from pneumonia.federated.aggregate import ClientUpdate, State, weighted_average
from pneumonia.training.privacy import rdp_accountant

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
STRATEGIES: Registry[type[Strategy]] = Registry("federated.strategy", sort=True)


def create_strategy(cfg, module: nn.Module) -> Strategy:
    """The strategy `cfg.strategy` (a FederatedConfig) names, for a model shaped like `module`."""
    return STRATEGIES.get(cfg.strategy).from_config(cfg, module)


def normalization_keys(module: nn.Module) -> set[str]:
    """State-dict keys of every normalisation layer (weights, biases, running statistics)."""
    keys = set()
    for name, layer in module.named_modules():
        if isinstance(layer, NORM_TYPES):
            keys |= {f"{name}.{k}" if name else k for k in layer.state_dict()}
    return keys


class Strategy:
    """The base: clients train alike and send everything; the server takes the
    sample-count-weighted average of their state dicts (FedAvg's rule)."""

    local_keys: frozenset[str] = frozenset()

    @classmethod
    def from_config(cls, cfg, module: nn.Module) -> Strategy:
        """Build it from the `federated.*` config, for a model shaped like `module`."""
        return cls()

    def client_callbacks(self, global_state: State) -> list[Callback]:
        return []

    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate]) -> State:
        return weighted_average([u.state for u in updates], [u.n for u in updates])

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@STRATEGIES.register("fedavg")
class FedAvg(Strategy):
    """McMahan et al.: the sample-count-weighted average of the clients' state dicts."""


class ProximalTerm(Callback):
    """FedProx's mu/2 ||w - w_global||^2, added as its gradient mu (w - w_global) once the
    gradients are final (after AMP unscaling), so the module's loss stays untouched."""

    def __init__(self, mu: float, global_state: State) -> None:
        self.mu = mu
        self.anchor = global_state
        self._on_device: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.mu == 0:
            return
        for name, param in pl_module.named_parameters():
            if param.grad is None:
                continue
            if name not in self._on_device:
                self._on_device[name] = self.anchor[name].to(param.device, param.dtype)
            param.grad.add_(param.detach() - self._on_device[name], alpha=self.mu)


@STRATEGIES.register("fedprox")
class FedProx(Strategy):
    """Li et al.: FedAvg with a proximal term that keeps local training near the global model."""

    def __init__(self, mu: float) -> None:
        self.mu = mu

    @classmethod
    def from_config(cls, cfg, module: nn.Module) -> FedProx:
        return cls(cfg.mu)

    def client_callbacks(self, global_state: State) -> list[Callback]:
        return [ProximalTerm(self.mu, global_state)]


@STRATEGIES.register("fedbn")
class FedBN(Strategy):
    """Li et al. 2021: normalisation layers never leave their client. Clients train with their
    own norm layers; the server still averages them, and evaluates the global model with those
    averaged norm layers (it has no client's own statistics)."""

    def __init__(self, norm_keys: Iterable[str]) -> None:
        self.local_keys = frozenset(norm_keys)

    @classmethod
    def from_config(cls, cfg, module: nn.Module) -> FedBN:
        return cls(normalization_keys(module))


class ServerOptimizer(Strategy):
    """Reddi et al.'s FedOpt: the averaged update, global - average, is a pseudo-gradient for
    a server optimizer (`make_optimizer`, and `default_lr` without federated.server_lr).
    Buffers are averaged."""

    default_lr = 1.0

    def __init__(self, parameter_keys: Iterable[str], lr: float, momentum: float):
        self.lr, self.momentum = lr, momentum
        self.parameter_keys = sorted(parameter_keys)
        self.params: dict[str, torch.Tensor] | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._pending: dict | None = None  # optimizer state restored before the first round

    def _built(self, global_state: State) -> tuple[dict[str, torch.Tensor], torch.optim.Optimizer]:
        """The server's float parameters and their optimizer, built at the first round (with
        the optimizer state a resume restored)."""
        if self.params is None or self.optimizer is None:
            self.params = {k: global_state[k].detach().clone().float() for k in self.parameter_keys}
            self.optimizer = self.make_optimizer(list(self.params.values()))
            if self._pending is not None:
                self.optimizer.load_state_dict(self._pending)
                self._pending = None
        return self.params, self.optimizer

    @classmethod
    def from_config(cls, cfg, module: nn.Module) -> ServerOptimizer:
        lr = cfg.server_lr if cfg.server_lr is not None else cls.default_lr
        return cls([name for name, _ in module.named_parameters()], lr, cfg.server_momentum)

    def make_optimizer(self, tensors: list[torch.Tensor]) -> torch.optim.Optimizer:
        raise NotImplementedError

    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate]) -> State:
        average = super().aggregate(global_state, updates)
        params, optimizer = self._built(global_state)
        for key, param in params.items():
            param.copy_(global_state[key])
            param.grad = global_state[key].float() - average[key].float()
        optimizer.step()
        return average | {k: p.detach().clone().to(average[k].dtype) for k, p in params.items()}

    def state_dict(self) -> dict:
        return self.optimizer.state_dict() if self.optimizer is not None else (self._pending or {})

    def load_state_dict(self, state: dict) -> None:
        self._pending = state or None


@STRATEGIES.register("fedavgm")
class FedAvgM(ServerOptimizer):
    """Hsu et al.: server SGD with momentum on the averaged update (server_lr default 1)."""

    def make_optimizer(self, tensors: list[torch.Tensor]) -> torch.optim.Optimizer:
        return torch.optim.SGD(tensors, lr=self.lr, momentum=self.momentum)


@STRATEGIES.register("fedadam")
class FedAdam(ServerOptimizer):
    """Reddi et al.: server Adam on the averaged update (server_lr default 0.01)."""

    default_lr = 0.01

    def make_optimizer(self, tensors: list[torch.Tensor]) -> torch.optim.Optimizer:
        # tau = 1e-3 as the adaptivity constant, as in Reddi et al.
        return torch.optim.Adam(tensors, lr=self.lr, betas=(0.9, 0.99), eps=1e-3)


class CoordinateWise(Strategy):
    """A robust aggregator: each coordinate of the next global state is a statistic of that
    coordinate across the clients' states, unweighted (a client's image count buys no extra
    say), so a minority of arbitrary updates cannot move it far. Integer buffers are rounded
    half up, as in the average."""

    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate]) -> State:
        out: State = {}
        for key, first in global_state.items():
            stacked = torch.stack([u.state[key].detach().to("cpu", torch.float64) for u in updates])
            value = self.statistic(stacked.sort(dim=0).values)
            out[key] = (
                value.to(first.dtype)
                if first.is_floating_point()
                else (torch.floor(value + 0.5).to(first.dtype))
            )
        return out

    def statistic(self, ordered: torch.Tensor) -> torch.Tensor:
        """The value per coordinate, from the clients' values sorted along dim 0."""
        raise NotImplementedError


@STRATEGIES.register("median")
class Median(CoordinateWise):
    """Yin et al. 2018: the coordinate-wise median (the mean of the two middle values for an
    even number of clients)."""

    def statistic(self, ordered: torch.Tensor) -> torch.Tensor:
        k = ordered.shape[0]
        return (ordered[(k - 1) // 2] + ordered[k // 2]) / 2


@STRATEGIES.register("trimmed_mean")
class TrimmedMean(CoordinateWise):
    """Yin et al. 2018: per coordinate, drop the ceil(trim_fraction x k) largest and as many
    smallest of the k clients' values (at least one each, while two or more clients remain
    beside them) and average the rest. With three clients it keeps the middle one."""

    def __init__(self, trim_fraction: float) -> None:
        self.trim_fraction = trim_fraction

    @classmethod
    def from_config(cls, cfg, module: nn.Module) -> TrimmedMean:
        return cls(cfg.trim_fraction)

    def trimmed(self, k: int) -> int:
        """How many values are cut from each end, of k."""
        return min(max(math.ceil(self.trim_fraction * k), 1), (k - 1) // 2)

    def statistic(self, ordered: torch.Tensor) -> torch.Tensor:
        k = ordered.shape[0]
        cut = self.trimmed(k)
        return ordered[cut : k - cut].mean(dim=0)


def clip_update(update: State, global_state: State, bound: float) -> tuple[State, float]:
    """The change w - w_global of every float tensor, scaled down to L2 norm `bound` when it
    is larger (jointly over all tensors), and its norm before clipping."""
    delta = {
        k: update[k].detach().to("cpu", torch.float64) - v.to(torch.float64)
        for k, v in global_state.items()
        if v.is_floating_point()
    }
    norm = math.sqrt(sum(float(d.pow(2).sum()) for d in delta.values()))
    scale = min(1.0, bound / norm) if norm > 0 else 1.0
    return {k: d * scale for k, d in delta.items()}, norm


class ServerDP(Strategy):
    """User-level DP-FedAvg (McMahan et al. 2018, "Learning differentially private recurrent
    language models") wrapped around any averaging strategy: each update w_j - w_global is
    clipped to `clip_norm`, the sum of the clipped updates gets Gaussian noise of std
    noise_multiplier x clip_norm, and the sum over the m clients a round samples (a fixed
    denominator, so one hospital moves it by at most clip_norm / m) goes to the wrapped
    strategy as the round's one averaged update (FedAvg takes it, FedAdam steps on it).

    Its accountant (Opacus's RDP, sampling rate m / J per round) bounds what the global models
    reveal about whether a whole hospital took part. With every client in every round
    (m = J) there is no amplification by sampling, and with 3 hospitals a useful epsilon
    needs more noise than the model can bear: the number says so honestly."""

    def __init__(self, base: Strategy, cfg, per_round: int, clients: int, seed: int) -> None:
        self.base, self.cfg, self.per_round = base, cfg, per_round
        self.local_keys = base.local_keys
        self.sample_rate = per_round / clients
        self.accountant = rdp_accountant()
        self.generator = torch.Generator().manual_seed(seed)

    def client_callbacks(self, global_state: State) -> list[Callback]:
        return self.base.client_callbacks(global_state)

    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate]) -> State:
        total: dict[str, torch.Tensor] = {}
        for update in updates:
            clipped, _ = clip_update(update.state, global_state, self.cfg.clip_norm)
            for key, delta in clipped.items():
                total[key] = total[key] + delta if key in total else delta
        std = self.cfg.noise_multiplier * self.cfg.clip_norm
        # Integer buffers (BatchNorm's step counts) are counts, not weights: their plain
        # average, as FedAvg takes it; the float tensors are all in `total`.
        counts = [k for k in global_state if k not in total]
        states = [{k: u.state[k] for k in counts} for u in updates]
        noisy = weighted_average(states, [u.n for u in updates]) if counts else {}
        for key, summed in total.items():
            noise = torch.normal(0.0, std, summed.shape, generator=self.generator).double()
            step = (summed + noise) / self.per_round
            noisy[key] = (global_state[key].double() + step).to(global_state[key].dtype)
        self.accountant.step(
            noise_multiplier=self.cfg.noise_multiplier, sample_rate=self.sample_rate
        )
        one = ClientUpdate(-1, noisy, n=1, train_loss=math.nan, train_accuracy=math.nan)
        return self.base.aggregate(global_state, [one])

    def epsilon(self) -> float:
        """Epsilon spent so far at server_dp.delta (inf without noise)."""
        if len(self.accountant) == 0:
            return 0.0
        if self.cfg.noise_multiplier == 0:
            return math.inf
        return float(self.accountant.get_epsilon(delta=self.cfg.delta))

    def state_dict(self) -> dict:
        history = [(float(s), float(q), int(n)) for s, q, n in self.accountant.history]
        return {
            "base": self.base.state_dict(),
            "history": history,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.base.load_state_dict(state["base"])
        self.accountant.history = [tuple(entry) for entry in state["history"]]
        self.generator.set_state(state["generator"])


def with_server_dp(strategy: Strategy, cfg, per_round: int, clients: int, seed: int) -> Strategy:
    """`strategy`, wrapped in ServerDP when federated.server_dp.enabled (cfg: FederatedConfig)."""
    if not cfg.server_dp.enabled:
        return strategy
    return ServerDP(strategy, cfg.server_dp, per_round, clients, seed)
