"""What a federated run tells of its federation, beyond the rounds' metrics: the partition and
the sites' acquisition profiles it starts with (console, TensorBoard, partition.csv), and
summary.json's `federated` and `privacy` records (the per-round columns are
`pneumonia.run.monitor`'s)."""

from __future__ import annotations

import logging
from pathlib import Path

from jsonargparse import Namespace
from torch.utils.tensorboard import SummaryWriter

from pneumonia.core.files import write_csv
from pneumonia.data.partition import format_table
from pneumonia.data.sites import profile_rows, site_profiles
from pneumonia.federated.cohort import Cohort
from pneumonia.federated.options import FederatedConfig, shifts_sites
from pneumonia.federated.strategies import ServerDP, Strategy
from pneumonia.run.rundir import PARTITION

log = logging.getLogger(__name__)


def announce(
    fed: FederatedConfig, cohort: Cohort, tensorboard: SummaryWriter, run_dir: Path
) -> None:
    """The clients' partition (and reshaped sites' profiles) on the console, in TensorBoard
    and in partition.csv."""
    table = format_table(cohort.table)
    log.info(f"clients ({fed.partition} partition):\n{table}")
    if shifts_sites(fed):
        profiles = site_profiles(len(cohort.site_table), fed.site_seed)
        lines = "\n".join(f"  site {j}: {p.describe()}" for j, p in enumerate(profiles))
        log.info(f"site acquisition profiles:\n{lines}")
        tensorboard.add_text("site_profiles", lines, 0)
    write_csv(run_dir / PARTITION, cohort.table)
    tensorboard.add_text("partition", table, 0)


def federated_record(fed: FederatedConfig, cohort: Cohort, rows: list[dict]) -> dict:
    """summary.json's `federated`: the federation and the rounds trained (`rows`: rounds.csv's)."""
    return {
        "federated": {
            "strategy": fed.strategy,
            "partition": fed.partition,
            "clients": len(cohort),
            "rounds": len(rows),
            "local_epochs": fed.local_epochs,
            "mb_sent": round(sum(row.get("mb_sent", 0) for row in rows), 3),
            "partition_table": cohort.table,
        }
        | site_details(fed, cohort)
    }


def site_details(fed: FederatedConfig, cohort: Cohort) -> dict:
    """summary.json's account of reshaped sites: profiles, the held-out site, pooling."""
    out: dict = {}
    if shifts_sites(fed):
        profiles = site_profiles(len(cohort.site_table), fed.site_seed)
        out["site_profiles"] = profile_rows(profiles)
    if fed.hold_out is not None:
        out["hold_out"] = fed.hold_out
    if fed.pooled:
        out["pooled"] = True
    if out:
        out["site_table"] = cohort.site_table
    return out


def privacy_record(cfg: Namespace, strategy: Strategy, rows: list[dict], n_clients: int) -> dict:
    """summary.json's `privacy`: each client's final (epsilon, delta) under DP-SGD, the
    server's under server_dp; absent for a run without differential privacy."""
    out: dict = {}
    if cfg.privacy.enabled:
        out["clients"] = client_privacy(cfg.privacy, rows, n_clients)
    if isinstance(strategy, ServerDP):
        s = cfg.federated.server_dp
        out["server"] = {
            "mechanism": "user-level DP-FedAvg on the server",
            "epsilon": round(strategy.epsilon(), 4),
            "delta": s.delta,
            "noise_multiplier": s.noise_multiplier,
            "clip_norm": s.clip_norm,
        }
    return {"privacy": out} if out else {}


def client_privacy(p: Namespace, rows: list[dict], n_clients: int) -> dict:
    """The clients' DP-SGD guarantee: each one's epsilon as of the last round it trained."""
    last: dict[str, float] = {}
    for row in rows:
        for j in range(n_clients):
            if row.get(f"client{j}_epsilon", "") != "":
                last[str(j)] = row[f"client{j}_epsilon"]
    return {
        "mechanism": "DP-SGD (Opacus), per client",
        "epsilon": max(last.values(), default=0.0),
        "epsilon_per_client": last,
        "delta": p.delta,
        "accountant": p.accountant,
        "max_grad_norm": p.max_grad_norm,
        "noise": f"noise_multiplier {p.noise_multiplier}"
        if p.noise_multiplier is not None
        else f"calibrated per client for target_epsilon {p.target_epsilon}",
    }
