"""Federated overhead: a FedAvg run against centralized training of the same sample-steps.

FedAvg: J clients (IID, all taking part), T rounds of E local epochs. Centralized: T x E epochs
over the same training images, validating every E epochs, so both see every training image
T x E times, take the same number of optimizer steps (to within the clients' last partial
batches) and validate T times. Both are `python -m pneumonia.fit` runs, timed from the call to
the summary, in alternating order; what FedAvg adds is its per-round work: client Trainers'
fit start-up, data-loader start, state-dict copies, aggregation and round state files.

    python bench/federated.py                     # synthetic images, 64 px
    python bench/federated.py --root ../shared/data/chest_xray/train

Goal: FedAvg / centralized <= 1.10.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import common
from common import Samples, machine, ratio_line, run_fit, train_images

from pneumonia.core.errors import exit_on_user_error


def fit_args(args: argparse.Namespace, run_dir: Path, federated: bool) -> list[str]:
    argv = ["--config", str(common.ROOT / "configs" / "default.yaml"), "--run_dir", str(run_dir)]
    argv += ["--data.image_size", str(args.size), "--data.batch_size", str(args.batch)]
    argv += ["--model.width", str(args.width)]
    argv += ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    if args.root:
        argv += ["--data.root", args.root]
    else:
        argv += ["--data.synthetic.n_patients", str(args.patients)]
    if federated:
        argv += ["--federated.clients", str(args.clients), "--federated.rounds", str(args.rounds)]
        return argv + ["--federated.local_epochs", str(args.local_epochs)]
    argv += ["--federated.enabled", "false", "--trainer.max_epochs"]
    argv += [str(args.rounds * args.local_epochs)]
    return argv + ["--trainer.check_val_every_n_epoch", str(args.local_epochs)]


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", help="a Kermany train folder (default: synthetic images)")
    parser.add_argument("--patients", type=int, default=400, help="synthetic patients")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--width", type=int, default=64, help="model.width (64: the paper's)")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local_epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(machine())
    fed, central, ratios = Samples("s"), Samples("s"), []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            # Alternate which goes first, so a machine that warms up or slows down hits both.
            order = (True, False) if r % 2 == 0 else (False, True)
            times = {}
            for federated in order:
                run_dir = Path(tmp) / f"{'fed' if federated else 'central'}{r}"
                times[federated], _ = run_fit(fit_args(args, run_dir, federated))
            fed.add(times[True])
            central.add(times[False])
            ratios.append(times[True] / times[False])
        train = train_images(run_dir)
    print(
        f"{args.clients} clients x {args.rounds} rounds x {args.local_epochs} local epochs vs "
        f"{args.rounds * args.local_epochs} centralized epochs; {args.size} px, batch {args.batch}"
        + f", {train} training images"
    )
    print(f"FedAvg run: {fed}")
    print(f"centralized run: {central}")
    per_round = (fed.median - central.median) / args.rounds
    print(f"FedAvg's extra time per round (medians): {per_round:.2f} s")
    ratio = sorted(ratios)[len(ratios) // 2]
    print(ratio_line("FedAvg / centralized wall time, median", ratio, "<= 1.10", ratio <= 1.10))


if __name__ == "__main__":
    main()
