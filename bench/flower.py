"""Flower's cost: the same small federated job in the in-process loop and over Flower on
loopback (a SuperLink and one SuperNode per client, TLS), and where Flower's extra time goes.

Both are the same `fit` config (the Flower run is bit-identical in its metrics). The Flower
round is split, per client, with the instants each node reports and the server's send and
receive times (one machine, one clock):

    start       server sends -> the node's handler runs: SuperNode polling, a fresh ClientApp
                process, Python, Flower, torch, Lightning and pneumonia imports, the message
    setup       config parse, images, LightningModule, Trainer
    training    the local epochs (what the in-process round spends too)
    reply       state dict to Flower, pushed, pulled by the server
    server      after the last reply: aggregation, evaluation, checkpoints

    python bench/flower.py [--nodes 3] [--rounds 2] [--config configs/flower_demo.yaml]
"""

from __future__ import annotations

import argparse
import csv
import shlex
import statistics
import tempfile
import time
from pathlib import Path

import common
from common import machine, run_fit

from pneumonia.core.errors import UserError, exit_on_user_error
from pneumonia.flower.launch import Federation

SEGMENTS = {  # name: (from, to) instants
    "start": ("sent", "handler"),
    "setup": ("handler", "ready"),
    "training": ("ready", "trained"),
    "reply": ("trained", "received"),  # includes the ClientApp process's exit
}


def fit_argv(args: argparse.Namespace, runs_root: Path) -> list[str]:
    argv = ["--config", str(args.config.resolve()), "--runs_root", str(runs_root)]
    argv += ["--federated.clients", str(args.nodes), "--federated.rounds", str(args.rounds)]
    argv += ["--trainer.enable_progress_bar", "false"]
    return argv + args.fit_options


def round_times(run_dir: Path) -> list[float]:
    with open(run_dir / "rounds.csv") as f:
        return [float(row["round_s"]) for row in csv.DictReader(f)]


def over_flower(args: argparse.Namespace, tmp: Path) -> tuple[float, dict]:
    """(seconds from submit to result, status) of the job over Flower."""
    with Federation(tmp / "federation") as federation:
        federation.start_superlink()
        federation.start_partition_nodes(args.nodes)
        started = time.perf_counter()
        overrides = shlex.join(fit_argv(args, tmp / "flower")[2:])  # all but --config
        status = federation.submit(
            {
                "config": str(args.config.resolve()),
                "overrides": overrides,
                "wait-for-nodes": 120,
                "timings": True,  # the nodes time their steps only when asked
            },
            echo=lambda line: None,
        )
        seconds = time.perf_counter() - started
    if not status["ok"]:
        raise UserError(f"the Flower run failed: {status['error']}")
    return seconds, status


def breakdown(status: dict, rounds_s: list[float]) -> list[str]:
    """Mean seconds per round of each segment, over rounds and clients."""
    per_segment: dict[str, list[float]] = {name: [] for name in SEGMENTS}
    server = []
    for timings, round_s in zip(status["timings"], rounds_s, strict=True):
        for t in timings.values():
            for name, (start, end) in SEGMENTS.items():
                per_segment[name].append(t[end] - t[start])
        last = max(t["received"] for t in timings.values())
        first_sent = min(t["sent"] for t in timings.values())
        server.append(round_s - (last - first_sent))
    lines = [f"  {name:9s} {statistics.mean(v):6.2f} s" for name, v in per_segment.items()]
    return lines + [f"  {'server':9s} {statistics.mean(server):6.2f} s"]


def flower_options(doc: str) -> argparse.Namespace:
    """--config, --nodes, --rounds and any fit options (`fit_options`) of a Flower bench."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--config", type=Path, default=common.ROOT / "configs" / "flower_demo.yaml")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    args, args.fit_options = parser.parse_known_args()
    if not args.config.is_file():
        raise UserError(f"{args.config} not found: pass --config a fit YAML")
    return args


@exit_on_user_error
def main() -> None:
    args = flower_options(__doc__)
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        local_s, local = run_fit(fit_argv(args, tmp / "local"))
        flower_s, status = over_flower(args, tmp)
        local_rounds = round_times(Path(local["run_dir"]))
        flower_rounds = round_times(Path(status["run_dir"]))
        lines = breakdown(status, flower_rounds)
    print(
        f"{args.nodes} clients x {args.rounds} rounds, {args.config.name}",
        *args.fit_options,
    )
    print(
        f"in-process run: {local_s:.1f} s, rounds {', '.join(f'{s:.1f}' for s in local_rounds)} s"
    )
    print(
        f"Flower run (submit to result): {flower_s:.1f} s, rounds "
        f"{', '.join(f'{s:.1f}' for s in flower_rounds)} s"
    )
    print(f"Flower / in-process wall time: {flower_s / local_s:.2f}")
    print("a Flower round, mean per client (segments overlap across clients):")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
