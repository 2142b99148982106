"""DP-SGD's cost: one local epoch of a federated client with privacy on, against the same
client without it.

Both are the package's own `Client` (its DataModule, module and kept Lightning Trainer),
training SE-ResNet-18-GN on the same random uint8 images at the same batch size; the private
one adds Opacus's per-sample gradient hooks, clipping, noise and Poisson batches. Each repeat
trains both, alternating which goes first; the ratio is of the medians. The first epoch of
each client is a warm-up and is not timed.

    python bench/privacy.py                 # 64 px, width 64, batch 32, 640 images
    python bench/privacy.py --width 32      # a narrower model

Goal (issue 16): private / plain under 3x "if the library allows".
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (puts the repository on sys.path)
import torch
from common import Samples, machine, ratio_line
from train_step import random_images

from pneumonia.core.errors import exit_on_user_error
from pneumonia.data.transforms import AugmentConfig
from pneumonia.federated.client import Client, ClientSettings
from pneumonia.training.privacy import PrivacyConfig
from pneumonia.training.recipe import Recipe


def client(private: bool, args, log_dir: Path) -> Client:
    recipe = Recipe(
        model={"name": "se_resnet18", "norm": "gn", "width": args.width, "gn_groups": 16},
        optim={"name": "adamw", "lr": 1e-3, "weight_decay": 5e-4, "scheduler": "none"},
        image_size=args.size,
    )
    settings = ClientSettings(
        batch_size=args.batch,
        balance="none",
        augment=AugmentConfig(enabled=True),
        num_workers=0,
        seed=0,
        trainer_args={
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "accelerator": "cpu",
        },
        privacy=PrivacyConfig(enabled=True, noise_multiplier=1.0) if private else None,
        planned_epochs=args.repeats + 1,
    )
    images = random_images(args.images, args.size)
    return Client(int(private), images, settings, recipe, log_dir)


def epoch_seconds(c: Client, round_index: int) -> float:
    state = {k: v.clone() for k, v in c.module.state_dict().items()}
    start = time.perf_counter()
    c.train_round(state, round_index, 1)
    return time.perf_counter() - start


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(machine())
    print(
        f"one local epoch of {args.images} images, SE-ResNet-18-GN width {args.width}, "
        f"{args.size} px, batch {args.batch} (Poisson-sampled when private)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        clients = {
            name: client(name == "private", args, Path(tmp)) for name in ("plain", "private")
        }
        times = {name: Samples("s") for name in clients}
        for c in clients.values():
            epoch_seconds(c, 0)  # warm-up
        for r in range(args.repeats):
            order = list(clients) if r % 2 == 0 else list(reversed(clients))
            for name in order:
                times[name].add(epoch_seconds(clients[name], r + 1))
    for name, samples in times.items():
        print(f"{name:8s} {samples}  ({args.images / samples.median:.0f} img/s)")
    ratio = times["private"].median / times["plain"].median
    print(ratio_line("DP-SGD / plain, seconds per local epoch", ratio, "< 3", ratio < 3))
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    if peak:
        print(f"peak GPU memory {peak / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
