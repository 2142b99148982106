"""The `federated.*` config group."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

from pneumonia.core.bounds import (
    FractionBelowHalf,
    FractionBelowOne,
    FractionUpToOne,
    NonNegativeFloat,
    NonNegativeInt,
    OpenUnitInterval,
    PositiveFloat,
    PositiveInt,
    Seed,
)
from pneumonia.core.errors import UserError
from pneumonia.federated.strategies import STRATEGIES
from pneumonia.training.schedules import DECAY_NAMES, DecayConfig, decay_factor

log = logging.getLogger(__name__)


@dataclass
class HostileConfig:
    """Makes one simulated client (`client`; None: none) send global + `scale` x its true
    update (a model-replacement attack, or a broken client) and claim `claimed_images`
    training images (None: its true count). Simulated runs only: a real hospital is not told
    to misbehave."""

    client: NonNegativeInt | None = None  # the hostile client's index; null: none
    scale: float = 1.0  # it sends global + scale x its true update (1: its true update)
    claimed_images: PositiveInt | None = None  # images it claims; null: its true count


@dataclass
class ServerDPConfig:
    """User-level DP-FedAvg on the server (McMahan et al. 2018): each sampled client's update
    w_j - w_global is clipped to L2 norm `clip_norm`, the clipped updates are averaged with
    equal weights and Gaussian noise of std noise_multiplier x clip_norm / m is added to the
    mean, before the strategy (FedAvg, FedProx, FedAdam, ...) applies it. Its own accountant
    (RDP, sampling rate m / J per round) states (epsilon, delta) for a whole hospital."""

    enabled: bool = False  # clip and noise the clients' updates on the server
    noise_multiplier: NonNegativeFloat = 1.0  # the noise's std / clip_norm
    clip_norm: PositiveFloat = 1.0  # each update's L2 norm is clipped to this
    delta: OpenUnitInterval = 0.01  # must be below 1 / J: a hospital is the unit protected


@dataclass
class FederatedConfig:
    """FedAvg and its variants across simulated hospitals (off: centralized training)."""

    enabled: bool = False  # false: one centralized trainer over all training images
    clients: PositiveInt = 3  # J; ignored by partition=sites (one client per site folder)
    fraction: FractionUpToOne = 1.0  # C: each round samples max(round(C*J), 1) clients
    rounds: PositiveInt = 20  # T
    local_epochs: PositiveInt = 10  # E
    # sites_shift: iid, and every site images in its own way (site_shift below).
    partition: Literal["iid", "dirichlet", "quantity", "sites", "sites_shift"] = "iid"
    alpha: PositiveFloat = 0.5  # dirichlet (label skew) and quantity (size skew) concentration
    # Simulated sites only (pneumonia.data.sites). site_shift: each site's images, training
    # and validation, under that site's acquisition profile (tone, contrast, sharpness, noise,
    # resolution), drawn from site_seed; with any partition (dirichlet: label and feature skew).
    site_shift: bool = False
    site_seed: Seed = 2022  # seed of the sites' acquisition profiles (site_shift)
    # Leave-one-site-out: site hold_out trains nowhere; all its images (training and
    # validation) are scored as the `held_out` set.
    hold_out: NonNegativeInt | None = None
    # The (kept) sites' training images pooled in one client: centralized training over them
    # through the same loop, for comparisons with the federation on the same sites.
    pooled: bool = False
    # Also train each site's local model alone (rounds x local_epochs epochs on its own
    # images) and write the matrix of every model (each local, the global) on every site's
    # validation images: cross_site.csv and cross_site.png.
    cross_site: bool = False
    # How the server combines the clients' updates (pneumonia.federated.strategies; median
    # and trimmed_mean are the robust aggregators).
    strategy: str = "fedavg"
    mu: NonNegativeFloat = 0.01  # fedprox: weight of the proximal term mu/2 ||w - w_global||^2
    server_lr: PositiveFloat | None = None  # fedavgm / fedadam; null: 1.0 / 0.01
    server_momentum: FractionBelowOne = 0.9  # fedavgm
    min_clients: PositiveInt = 1  # a round fails with fewer valid updates than this
    keep_optimizer_state: bool = False  # false: each round starts a fresh client optimizer
    # Client learning rate across rounds: optim.lr throughout (constant), or decayed by round
    # with one of TensorFlow's decays (pneumonia.training.schedules; parameters in optim.decay.*).
    round_lr: Literal[DECAY_NAMES] = "constant"  # type: ignore[valid-type]  # registry names
    # The reported model: 0 picks the best round by `monitor`; K > 0 reports the average of
    # the last K rounds' global models (server-side weight averaging, SWA's counterpart; all
    # rounds when there are fewer, so a shortened run keeps its config's rule).
    average_rounds: NonNegativeInt = 0
    trim_fraction: FractionBelowHalf = 0.1  # trimmed_mean: share of clients cut at each end
    # Updates the server leaves out besides malformed ones and wrong image counts
    # (pneumonia.federated.aggregate.UpdateChecks): a norm ||w_j - w_global|| above
    # update_norm_ratio x the median norm of the round's other updates (0: no such bound),
    # or above max_update_norm (null: no bound).
    update_norm_ratio: NonNegativeFloat = 10.0
    max_update_norm: PositiveFloat | None = None  # the bound on every update's norm (above)
    # Simulation only: a hostile or broken hospital, for robustness studies.
    hostile: HostileConfig = field(default_factory=HostileConfig)
    server_dp: ServerDPConfig = field(default_factory=ServerDPConfig)
    # Flower deployments only: Flower's SecAgg+ masks every update, so the server learns
    # only the weighted sum of the round's updates (at least 3 clients; not with the robust
    # strategies or server_dp, which need each update on its own).
    secure_aggregation: bool = False
    # Where the clients of a round train: local, one after another in this process;
    # simulation, side by side in the workers of Flower's simulation runtime (Ray: pip install
    # 'pneumonia[simulation]'), as many at once as client_cpus and client_gpus allow. The same
    # rounds, run directory and resume either way, bit for bit where this process's torch
    # threads equal client_cpus (site_shift, sites_shift, hold_out, pooled, cross_site,
    # partition sites and secure_aggregation need local).
    engine: Literal["local", "simulation"] = "local"
    # engine simulation: cores for each client's worker, which trains on as many torch
    # threads; workers at once = the cores here / client_cpus, at most federated.clients
    client_cpus: PositiveInt = 1
    # engine simulation: GPUs for each client's worker (0.5: two to a GPU; 0: on CPU)
    client_gpus: NonNegativeFloat = 0.0


def check_federated(cfg: FederatedConfig) -> None:
    """What the parser's ranges (pneumonia.core.bounds) cannot say: a strategy by its registered
    name, and a hostile client among the clients; a line of warning for an average that takes
    in most of the run (`warn_average_rounds`)."""
    STRATEGIES.get(cfg.strategy)  # an unknown name is a one-line error listing the known ones
    robust = cfg.strategy in ROBUST_STRATEGIES
    if cfg.server_dp.enabled and robust:
        raise UserError(
            f"federated.server_dp averages clipped updates and cannot use federated.strategy "
            f"{cfg.strategy}: use fedavg, fedprox, fedbn, fedavgm or fedadam"
        )
    if cfg.server_dp.enabled and cfg.server_dp.delta >= 1 / cfg.clients:
        raise UserError(
            f"federated.server_dp.delta {cfg.server_dp.delta:g} must be below 1 / "
            f"federated.clients ({1 / cfg.clients:.3g}): a hospital is the unit protected"
        )
    if cfg.secure_aggregation:
        check_secure_aggregation(cfg)
    check_sites(cfg)
    if cfg.hostile.client is not None and cfg.hostile.client >= cfg.clients:
        raise UserError(
            f"federated.hostile.client {cfg.hostile.client} is not one of the "
            f"{cfg.clients} clients (0-{cfg.clients - 1})"
        )
    warn_average_rounds(cfg)


def warn_average_rounds(cfg: FederatedConfig) -> None:
    """Warn when the reported average takes in more than half of the rounds: a schedule
    shortened below federated.average_rounds (say --federated.rounds 2 on a config that
    averages 3) reports the mean of every round, the first, barely trained ones included.
    A warning, not a refusal: shortening a shipped config for a quick run is a use the
    scripts document (bench/paper_protocol.py --federated.rounds 2), and the rule stays
    what the config says."""
    k = averaged_rounds(cfg)
    if cfg.rounds < 2 or 2 * k <= cfg.rounds:
        return
    first = cfg.rounds - k + 1
    log.warning(
        f"federated.average_rounds {cfg.average_rounds} covers {k} of the {cfg.rounds} "
        f"federated.rounds: the reported model is the mean of rounds {first}-{cfg.rounds}, "
        f"more than half of the run; set federated.average_rounds to at most "
        f"{cfg.rounds // 2} (or 0 to report the best round), or train more federated.rounds"
    )


def shifts_sites(cfg: FederatedConfig) -> bool:
    """Whether the sites image in their own ways (site_shift, or partition sites_shift)."""
    return cfg.site_shift or cfg.partition == "sites_shift"


def simulates_sites(cfg: FederatedConfig) -> bool:
    """Whether the run reshapes the simulated sites (options a real deployment cannot have)."""
    return shifts_sites(cfg) or cfg.hold_out is not None or cfg.pooled or cfg.cross_site


def check_sites(cfg: FederatedConfig) -> None:
    """hold_out names a site; pooling and the cross-site matrix exclude each other."""
    if cfg.hold_out is not None and cfg.partition != "sites" and cfg.hold_out >= cfg.clients:
        raise UserError(
            f"federated.hold_out {cfg.hold_out} is not one of the {cfg.clients} sites "
            f"(0-{cfg.clients - 1})"
        )
    if cfg.hold_out is not None and cfg.partition != "sites" and cfg.clients < 2:
        raise UserError("federated.hold_out needs federated.clients of at least 2")
    if (cfg.hold_out is not None or cfg.pooled) and cfg.hostile.client is not None:
        raise UserError(
            "federated.hostile names a client, and federated.hold_out or pooled renumber them: "
            "simulate a hostile client without them"
        )
    clients = 1 if cfg.pooled else cfg.clients - (cfg.hold_out is not None)
    if cfg.partition != "sites" and cfg.min_clients > clients:
        raise UserError(
            f"federated.min_clients {cfg.min_clients} is more than the {clients} client(s) "
            f"this run trains (federated.hold_out, pooled): lower it"
        )
    if cfg.pooled and cfg.cross_site:
        raise UserError(
            "federated.cross_site compares each site's model with the federation's: it does "
            "not apply to federated.pooled (one client)"
        )


# Aggregators that need every update on its own (order statistics per coordinate).
ROBUST_STRATEGIES = ("median", "trimmed_mean")


def check_secure_aggregation(cfg: FederatedConfig) -> None:
    """What secure aggregation rules out: the server sees only the sum of the updates."""
    if cfg.strategy in ROBUST_STRATEGIES:
        raise UserError(
            f"federated.secure_aggregation hides each update, and federated.strategy "
            f"{cfg.strategy} needs them one by one: use fedavg, fedprox, fedbn, fedavgm or fedadam"
        )
    if cfg.server_dp.enabled:
        raise UserError(
            "federated.server_dp clips each update on the server, which secure aggregation "
            "hides: use DP-SGD on the clients (privacy.enabled true) with secure aggregation"
        )
    per_round = clients_per_round(cfg.fraction, cfg.clients)
    if per_round < 3:
        raise UserError(
            f"federated.secure_aggregation needs at least 3 clients per round (federated."
            f"clients {cfg.clients} x fraction {cfg.fraction:g} gives {per_round}): with 2, "
            f"each learns the other's update from the sum"
        )


def averaged_rounds(cfg: FederatedConfig) -> int:
    """How many final rounds the reported model averages (0: none)."""
    return min(cfg.average_rounds, cfg.rounds)


def clients_per_round(fraction: float, clients: int) -> int:
    """m = max(round(C * J), 1), as in McMahan et al."""
    return max(round(fraction * clients), 1)


def round_lr_scale(
    schedule: str, round_index: int, rounds: int, decay: DecayConfig | None = None
) -> float:
    """Factor on optim.lr for round `round_index` (0-based) of `rounds`: `schedule`'s decay
    (pneumonia.training.schedules) stepped by round; cosine falls from 1 in the first round
    towards 0 (never reached) after the last."""
    return decay_factor(
        schedule, round_index, rounds, decay or DecayConfig(), key="federated.round_lr"
    )


def check_averaging(optim, fed: FederatedConfig) -> None:
    """Weight averaging is per run kind: steps centrally, rounds in a federation."""
    if optim.weight_averaging != "none" and fed.enabled:
        raise UserError(
            f"optim.weight_averaging {optim.weight_averaging} is for centralized runs: a "
            f"federated run averages its last rounds' global models (federated.average_rounds)"
        )
