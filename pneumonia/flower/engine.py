"""`federated.engine`: where a federated `fit` run trains its clients. `local` is the run layer's
own loop (`pneumonia.run.job` with a `LocalCohort`); `simulation` runs the same job with the
clients on Flower's simulation runtime (`pneumonia.flower.simulation`). What can be refused
before Flower and Ray load is refused here, each in one line.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from jsonargparse import Namespace

from pneumonia.core.errors import UserError
from pneumonia.federated.options import simulates_sites
from pneumonia.flower.launch import usable_cores
from pneumonia.run.progress import Progress

INSTALL = "pip install 'pneumonia[simulation]'"


def check_simulation(cfg: Namespace) -> None:
    """What federated.engine simulation cannot take: a central run, and the options that need
    every client's images in this process."""
    fed = cfg.federated
    if not fed.enabled:
        raise UserError(
            "federated.engine simulation trains a federation's clients: set federated.enabled "
            "true, or drop federated.engine"
        )
    if simulates_sites(fed):
        raise UserError(
            "federated.site_shift, sites_shift, hold_out, pooled and cross_site reshape the "
            "simulated sites in this process: they need federated.engine local, not engine "
            "simulation"
        )
    if fed.partition == "sites":
        raise UserError(
            "federated.partition sites makes one client per site folder, which federated.engine "
            "simulation does not count: use federated.engine local, or another partition"
        )
    if fed.secure_aggregation:
        raise UserError(
            "federated.secure_aggregation runs over the Flower deployment (python -m "
            "pneumonia.flower.demo, or flwr run), not on federated.engine simulation"
        )
    if fed.client_cpus > usable_cores():
        raise UserError(
            f"federated.client_cpus {fed.client_cpus} is more than the {usable_cores()} cores "
            f"here: lower it"
        )
    accelerator = str(dict(cfg.trainer).get("accelerator") or "auto")
    if accelerator in ("gpu", "cuda") and fed.client_gpus == 0:
        raise UserError(
            f"trainer.accelerator {accelerator} trains every client on a GPU: with "
            f"federated.engine simulation, give each client's worker its share "
            f"(federated.client_gpus 1, or 0.5 for two to a GPU)"
        )
    missing = [name for name in ("flwr", "ray") if importlib.util.find_spec(name) is None]
    if missing:
        what = f"{missing[0]}, which is" if len(missing) == 1 else "flwr and ray, which are"
        raise UserError(
            f"federated.engine simulation needs {what} not installed: {INSTALL} (or set "
            f"federated.engine local)"
        )


def run_on_engine(
    cfg: Namespace, config_yaml: str, resume: Path | None, progress: Progress | None
) -> dict:
    """The job of `fit` on federated.engine simulation; the summary."""
    check_simulation(cfg)
    from pneumonia.flower.simulation import run_simulated  # Flower and Ray: only now

    return run_simulated(cfg, config_yaml, resume, progress)
