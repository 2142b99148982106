"""The ServerApp the SuperLink runs: `fit`'s federated run, with the SuperNodes as its clients.

It reads the run config (`flwr run ... --run-config`), runs the job (`pneumonia.run.job`) with
a `FlowerCohort` as its clients, and writes the run directory a simulated run writes
(config.yaml, rounds.csv, TensorBoard events, checkpoints, summary.json) on the SuperLink's
machine. Run config keys:

    config           fit YAML (path on the SuperLink's machine); empty: configs/default.yaml
    overrides        more fit options, as on the command line ("--federated.rounds 5 ...")
    resume           a run directory to continue from its last completed round
    status-file      where to write {"ok": ..., "run_dir" or "error": ...} when it ends
    wait-for-nodes   seconds to wait for federated.clients SuperNodes
    round-timeout    seconds to wait for a round's replies
    timings          true: time every round's steps on every node, into the status file
                     (bench/flower.py); off by default
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from pneumonia.core.errors import UserError
from pneumonia.core.files import write_text_atomic
from pneumonia.core.startup import startup
from pneumonia.flower.cohort import FlowerCohort
from pneumonia.run.config import parse_fit_config
from pneumonia.run.job import run_job

app = ServerApp()


def fit_arguments(run_config: dict) -> list[str]:
    """The `fit` command line the run config stands for."""
    if run_config.get("resume"):
        return ["--resume", str(run_config["resume"])]
    argv = ["--config", str(run_config["config"])] if run_config.get("config") else []
    return argv + shlex.split(str(run_config.get("overrides", "")))


def serve(grid: Grid, run_config: dict) -> tuple[dict, list]:
    """Train over the connected SuperNodes; (summary, per-round node timings if asked)."""
    cohorts: list[FlowerCohort] = []

    def connect(cfg, config_yaml: str) -> FlowerCohort:
        cohort = FlowerCohort(
            grid,
            config_yaml,
            cfg.federated.clients,
            float(run_config.get("wait-for-nodes", 600)),
            float(run_config.get("round-timeout", 86400)),
            record_timings=bool(run_config.get("timings", False)),
        )
        cohorts.append(cohort)
        return cohort

    cfg, config_yaml, resume = parse_fit_config(fit_arguments(run_config))
    if cfg.federated.engine != "local":
        raise UserError(
            f"federated.engine {cfg.federated.engine} simulates the clients: a deployment's "
            f"clients are its SuperNodes (set federated.engine local)"
        )
    summary = run_job(cfg, config_yaml, resume, cohort=connect)
    return summary, cohorts[0].timings


def write_status(path: str, status: dict) -> None:
    if path:
        write_text_atomic(Path(path), json.dumps(status, indent=1))


@app.main()
def main(grid: Grid, context: Context) -> None:
    startup()  # a command's process settings: the round lines print, as in a simulated run
    run_config = dict(context.run_config)
    status_file = str(run_config.get("status-file", ""))
    try:
        summary, timings = serve(grid, run_config)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        write_status(status_file, {"ok": False, "error": str(err)})
        raise SystemExit(2) from None
    except BaseException as err:
        write_status(status_file, {"ok": False, "error": f"{type(err).__name__}: {err}"})
        raise
    status = {"ok": True, "run_dir": summary["run_dir"]}
    write_status(status_file, status | ({"timings": timings} if timings else {}))
