"""A central run on 2 processes (Lightning's DDP over gloo) against 1 process, on the same
images and global batch: wall time per epoch, and how far their summaries differ.

Per epoch: the time of a 1 + `--epochs` epoch run less that of a 1-epoch run, over `--epochs`,
so start-up (imports, Lightning's launch of process 1, the final scoring) cancels out. On a
machine with as many cores as processes the point is correctness and the ratio is the
overhead of the gradient exchange; with one GPU per process it is the speed-up.

    python bench/ddp.py                          # synthetic images, 64 px, SE-ResNet-18-GN
    python bench/ddp.py --root ../shared/data/chest_xray/train --size 64

Goal: the 2-process run's validation figures differ from the 1-process run's by no more than
the 1-process run's own differ when it runs on 1 thread instead of all cores. Both change only
the order of floating-point sums; over many steps Adam amplifies such differences (a gradient
near 0 changes sign), so runs agree to about 1e-7 only over a few steps (tests/test_ddp.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
from common import machine

from pneumonia.core.errors import UserError, exit_on_user_error

HEADLINE = ("val.", "val_shift.")  # the clean and shifted validation figures, not subgroups


def fit_args(args: argparse.Namespace, run_dir: Path, epochs: int, processes: int) -> list[str]:
    argv = ["--config", str(common.ROOT / "configs" / "default.yaml"), "--run_dir", str(run_dir)]
    argv += ["--federated.enabled", "false", "--trainer.accelerator", "cpu"]
    argv += ["--data.image_size", str(args.size), "--data.batch_size", str(args.batch)]
    argv += ["--model.width", str(args.width), "--trainer.max_epochs", str(epochs)]
    argv += ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    argv += ["--data.root", args.root] if args.root else ["--data.synthetic.n_patients", "400"]
    if processes > 1:
        argv += ["--trainer.devices", str(processes), "--trainer.strategy", "ddp"]
    return argv


def timed_fit(argv: list[str], threads: int) -> float:
    """Seconds of one `python -m pneumonia.fit` process (and the copies it starts)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pneumonia.fit", *argv],
        cwd=common.ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise UserError(f"fit failed: {done.stdout[-500:]}{done.stderr[-500:]}")
    return time.perf_counter() - start


def largest_difference(a: dict[str, float], b: dict[str, float]) -> tuple[float, str]:
    """The largest |a - b| over the headline validation figures, and its key."""
    return max((abs(a[k] - b[k]), k) for k in a if k.startswith(HEADLINE) and k in b)


def numbers(summary: dict, key: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in summary.items():
        if k in ("wall_time_s", "run_dir"):
            continue
        if isinstance(v, dict):
            out |= numbers(v, f"{key}{k}.")
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[f"{key}{k}"] = float(v)
    return out


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", help="a Kermany train folder (default: synthetic images)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32, help="the global batch")
    parser.add_argument("--width", type=int, default=64, help="model.width (64: the paper's)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs timed after the first")
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    print(machine())
    cores = os.cpu_count() or 1
    per_epoch, summaries = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for processes in (1, args.processes):
            # The machine's cores shared among the processes, as one process uses them all.
            threads = max(1, cores // processes)
            times = []
            for epochs in (1, 1 + args.epochs):
                run_dir = Path(tmp) / f"p{processes}e{epochs}"
                times.append(timed_fit(fit_args(args, run_dir, epochs, processes), threads))
            per_epoch[processes] = (times[1] - times[0]) / args.epochs
            summaries[processes] = numbers(json.loads((run_dir / "summary.json").read_text()))
        run_dir = Path(tmp) / "threads1"  # the noise floor: one process, another sum order
        timed_fit(fit_args(args, run_dir, 1 + args.epochs, 1), threads=1)
        floor = numbers(json.loads((run_dir / "summary.json").read_text()))
    one, many = summaries[1], summaries[args.processes]
    worst, key = largest_difference(one, many)
    noise, noise_key = largest_difference(one, floor)
    print(f"{args.size} px, width {args.width}, global batch {args.batch}, {cores} cores")
    for processes, seconds in per_epoch.items():
        print(f"{processes} process(es): {seconds:.1f} s per epoch")
    ratio = per_epoch[args.processes] / per_epoch[1]
    print(f"{args.processes} processes / 1 process, wall time per epoch: {ratio:.3f}")
    print(f"1 process on {cores} threads vs 1 thread: largest difference {noise:.4f} ({noise_key})")
    met = "met" if worst <= noise else "NOT met"
    print(
        f"{args.processes} processes vs 1: largest difference {worst:.4f} ({key}) "
        f"(goal <= the thread difference: {met})"
    )


if __name__ == "__main__":
    main()
