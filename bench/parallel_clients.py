"""Clients side by side: one federated round of 6 clients in the in-process loop (one after
another, every core for each) against the same round on federated.engine simulation (Flower's
simulation runtime: the clients in Ray workers of federated.client_cpus cores each, as many at
once as the cores allow).

Both are `python -m pneumonia.fit` runs of configs/fl_se_resnet_gn_cpu.yaml (SE-ResNet-18-GN,
64 px) cut to one round on a small synthetic set (or --root), timed from the call to the
summary; the engine's time includes Ray's start-up, which its round time (rounds.csv) does
not. The global models should agree to float rounding: the workers sum in another order
(their own thread count) than the in-process loop's threads.

    python bench/parallel_clients.py                  # 64 px, 6 clients, a few minutes
    python bench/parallel_clients.py --quick          # 32 px, width 16: the suite's check
    python bench/parallel_clients.py --root ../shared/data/chest_xray/train

Goal: in-process / engine wall time >= 1.5 with 2 or more workers.
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
from pathlib import Path

import common
import torch
from common import machine, ratio_line, run_fit, train_images

from pneumonia.core.errors import exit_on_user_error

CONFIG = common.ROOT / "configs" / "fl_se_resnet_gn_cpu.yaml"


def fit_args(args: argparse.Namespace, run_dir: Path, engine: str) -> list[str]:
    argv = ["--config", str(CONFIG), "--run_dir", str(run_dir), "--figures_every", "0"]
    argv += ["--federated.clients", str(args.clients), "--federated.rounds", "1"]
    argv += ["--federated.local_epochs", str(args.local_epochs)]
    argv += ["--data.image_size", str(args.size), "--model.width", str(args.width)]
    argv += ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    argv += ["--data.root", args.root] if args.root else ["--data.root", "null"]
    argv += ["--data.synthetic.n_patients", str(args.patients)]
    argv += ["--federated.engine", engine, "--federated.client_cpus", str(args.client_cpus)]
    return argv


def round_seconds(run_dir: Path) -> float:
    with open(run_dir / "rounds.csv") as f:
        return float(next(csv.DictReader(f))["round_s"])


def max_difference(a: Path, b: Path) -> float:
    """The largest absolute difference between two runs' global models (last.ckpt)."""
    ours = torch.load(a / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    theirs = torch.load(b / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    return max(
        (ours[k].double() - theirs[k].double()).abs().max().item()
        for k in ours
        if ours[k].is_floating_point()
    )


def options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", help="a Kermany train folder (default: synthetic images)")
    parser.add_argument("--patients", type=int, default=240, help="synthetic patients")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--local_epochs", type=int, default=3, help="the config's")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--width", type=int, default=64, help="model.width (64: the paper's)")
    parser.add_argument("--client_cpus", type=int, default=1, help="federated.client_cpus")
    parser.add_argument("--quick", action="store_true", help="32 px, width 16, 60 patients")
    args = parser.parse_args()
    if args.quick:
        args.size, args.width, args.patients, args.local_epochs = 32, 16, 60, 1
    return args


@exit_on_user_error
def main() -> None:
    args = options()
    print(machine())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = max(1, min(args.clients, (cores or 1) // args.client_cpus))
    with tempfile.TemporaryDirectory() as tmp:
        local_dir, engine_dir = Path(tmp) / "local", Path(tmp) / "engine"
        local_s, _ = run_fit(fit_args(args, local_dir, "local"))
        engine_s, _ = run_fit(fit_args(args, engine_dir, "simulation"))
        rounds = round_seconds(local_dir), round_seconds(engine_dir)
        difference = max_difference(local_dir, engine_dir)
        images = train_images(local_dir)
    print(
        f"{args.clients} clients x 1 round x {args.local_epochs} local epochs, {images} training "
        f"images, {args.size} px, SE-ResNet-18-GN width {args.width}"
    )
    print(
        f"in-process loop (one client after another, {torch.get_num_threads()} torch threads): "
        f"{local_s:.1f} s, its round {rounds[0]:.1f} s"
    )
    print(
        f"engine simulation ({workers} Ray workers of {args.client_cpus} core(s)): "
        f"{engine_s:.1f} s, its round {rounds[1]:.1f} s"
    )
    ratio = local_s / engine_s
    print(ratio_line("in-process / engine wall time", ratio, ">= 1.5", ratio >= 1.5))
    print(f"round time, in-process / engine: {rounds[0] / rounds[1]:.2f}")
    print(f"max |global weights, in-process - engine|: {difference:.3g}")


if __name__ == "__main__":
    main()
