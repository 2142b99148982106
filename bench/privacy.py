"""DP-SGD's cost per model: each model's private optimizer step against its plain one, each
DP model's private epoch against SE-ResNet-18-GN's, and whether the shipped private recipe
(configs/fl_private_cpu.yaml) steps within 2x of plain training.

Every figure comes from the package's own federated `Client` (its DataModule, module and kept
Lightning Trainer) training one local epoch, configured from the shipped private recipe's file
through the fit parser: its augmentation, optimizer (momentum SGD, lr 4), clip norm 0.1 and
class weights, with `--model.name` and the batch set per model. SE-ResNet-18-GN (width
`--width`, batch `--resnet_batch`) keeps its own recipe of before: AdamW, lr 1e-3, weight decay
5e-4. The noise is a fixed multiplier of 1.0 instead of the recipe's target epsilon: what it
costs does not depend on its size. Each model trains twice on the same random uint8 images at
the same batch with the same optimizer: plain (random batches of B) and private (Opacus's
per-sample gradient hooks, clipping, noise and Poisson batches of expected size B).

A step's time is the wall time between the end of an epoch's first optimizer step and the end
of its last, over the steps between: the loading, augmentation (with augmentation on, the
scattering models' fixed front end runs on every batch, plain and private alike), forward,
backward and update of a step as `fit` takes it, without the fit's start-up. An epoch's time is
the whole `train_round` call. Each client first takes one untimed warm-up step; then each
repeat trains every client for an epoch, in reversed order on odd repeats; ratios are of
medians (of 2 repeats by default: each order once, about 4-5 minutes on 2 CPU cores, most of it
SE-ResNet-18-GN's private epochs).

    python bench/privacy.py                              # 64 px, 1536 images, 4 models
    python bench/privacy.py --models scatter_linear      # the shipped recipe only
    python bench/privacy.py --batch 256 --resnet_batch 64

Goals: every model's private step under 3x its plain step; each DP model's private epoch
cheaper than SE-ResNet-18-GN's; the shipped recipe's private step under 2x its plain step.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import common  # noqa: F401  (puts the repository on sys.path)
import lightning as L
from common import ROOT, Samples, machine, ratio_line
from train_step import random_images

from pneumonia.core.errors import UserError, exit_on_user_error
from pneumonia.data.imageset import ImageSet
from pneumonia.federated.client import Client
from pneumonia.federated.cohort import client_settings
from pneumonia.run.config import build_fit_parser, parse_args
from pneumonia.training.recipe import make_recipe

SHIPPED = ROOT / "configs" / "fl_private_cpu.yaml"
DP_MODELS = ("scatter_linear", "scatter_cnn", "wsgn_cnn")
RESNET = "se_resnet18"
LABELS = {RESNET: "se_resnet18 (gn)"}
MODES = ("plain", "private")


def model_argv(name: str, args) -> list[str]:
    """Fit options of `name` on top of the shipped private recipe."""
    if name != RESNET:
        return ["--model.name", name, "--data.batch_size", str(args.batch)]
    return [
        *("--model.name", RESNET, "--model.norm", "gn", "--model.width", str(args.width)),
        *("--model.gn_groups", "16", "--data.batch_size", str(args.resnet_batch)),
        *("--optim.name", "adamw", "--optim.lr", "1e-3", "--optim.weight_decay", "5e-4"),
    ]


def fit_config(name: str, args):
    argv = ["--config", str(SHIPPED), "--data.image_size", str(args.size)]
    argv += ["--privacy.target_epsilon", "null", "--privacy.noise_multiplier", "1.0"]
    parser = build_fit_parser()
    return parser.instantiate(parse_args(parser, argv + model_argv(name, args)))


def client(name: str, mode: str, args, images: ImageSet, log_dir: Path) -> Client:
    """A client training `name` as the shipped recipe would, with or without DP-SGD."""
    cfg = fit_config(name, args)
    settings = replace(
        client_settings(cfg, {"accelerator": "cpu"}),
        num_workers=0,
        planned_epochs=args.repeats + 1,
        privacy=cfg.privacy if mode == "private" else None,
    )
    recipe = make_recipe(cfg, images.classes, [images.pixel_moments()])
    return Client(MODES.index(mode), images, settings, recipe, log_dir / name)


class StepClock(L.Callback):
    """The clock and the optimizer step count at the end of every training batch."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, int]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.marks.append((time.perf_counter(), trainer.global_step))

    def step_seconds(self, what: str) -> float:
        (start, first), (end, last) = self.marks[0], self.marks[-1]
        if last - first < 1:
            raise UserError(
                f"{what}: an epoch took fewer than 2 optimizer steps, so no step was timed: "
                "raise --images or lower --batch / --resnet_batch"
            )
        return (end - start) / (last - first)


def train_epoch(c: Client, round_index: int) -> tuple[float, StepClock]:
    """(seconds, its step clock) of one local epoch from the client's current weights."""
    state = {k: v.clone() for k, v in c.module.state_dict().items()}
    clock = StepClock()
    start = time.perf_counter()
    c.train_round(state, round_index, 1, callbacks=[clock])
    return time.perf_counter() - start, clock


def warm_up(c: Client) -> None:
    """One optimizer step, untimed: what the first step builds (the scattering filters,
    Opacus's optimizer, the Trainer's loops) is not a step's cost. One, not an epoch: a
    private SE-ResNet-18-GN epoch would add minutes."""
    c.trainer.limit_train_batches = 1
    try:
        train_epoch(c, 0)
    finally:
        c.trainer.limit_train_batches = 1.0


def measure(clients: dict, repeats: int) -> tuple[dict, dict]:
    """Per (model, mode): its step and epoch seconds, one sample per repeat."""
    steps = {key: Samples("s") for key in clients}
    epochs = {key: Samples("s") for key in clients}
    for c in clients.values():
        warm_up(c)
    for r in range(repeats):
        order = list(clients) if r % 2 == 0 else list(reversed(clients))
        for key in order:
            seconds, clock = train_epoch(clients[key], r + 1)
            epochs[key].add(seconds)
            steps[key].add(clock.step_seconds(" ".join(key)))
    return steps, epochs


def batch_of(name: str, args) -> int:
    return args.resnet_batch if name == RESNET else args.batch


def report(models: list[str], steps: dict, epochs: dict, args) -> None:
    for name in models:
        for mode in MODES:
            print(
                f"{LABELS.get(name, name):16s} {mode:8s} batch {batch_of(name, args):4d}: "
                f"step {steps[name, mode]}, epoch {epochs[name, mode]}"
            )
    for name in models:
        ratio = steps[name, "private"].median / steps[name, "plain"].median
        label = f"{LABELS.get(name, name)} DP-SGD / plain, seconds per optimizer step"
        print(ratio_line(label, ratio, "< 3", ratio < 3))
    if RESNET in models:
        reference = epochs[RESNET, "private"].median
        for name in (m for m in models if m != RESNET):
            ratio = epochs[name, "private"].median / reference
            label = f"{name} / se_resnet18 (gn), DP-SGD seconds per epoch of {args.images} images"
            print(ratio_line(label, ratio, "< 1", ratio < 1))
    if "scatter_linear" in models:
        ratio = steps["scatter_linear", "private"].median / steps["scatter_linear", "plain"].median
        label = (
            f"shipped private recipe ({SHIPPED.name}: scatter_linear, {args.size} px, batch "
            f"{args.batch}, its augmentation) DP-SGD / plain, seconds per optimizer step"
        )
        print(ratio_line(label, ratio, "< 2", ratio < 2))


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--images", type=int, default=1536, help="3 steps at batch 512")
    parser.add_argument("--repeats", type=int, default=2, help="2: each order once")
    parser.add_argument("--width", type=int, default=64, help="se_resnet18's")
    parser.add_argument("--batch", type=int, default=512, help="the DP models' (the recipe's)")
    parser.add_argument("--resnet_batch", type=int, default=32, help="se_resnet18's")
    parser.add_argument(
        "--models", nargs="+", choices=[*DP_MODELS, RESNET], default=[*DP_MODELS, RESNET]
    )
    args = parser.parse_args()
    args.models = list(dict.fromkeys(args.models))
    print(machine())
    print(
        f"one local epoch of {args.images} random images, {args.size} px, the shipped private "
        f"recipe's augmentation, noise multiplier 1.0; SE-ResNet-18-GN width {args.width}"
    )
    images = random_images(args.images, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        clients = {
            (name, mode): client(name, mode, args, images, Path(tmp))
            for name in args.models
            for mode in MODES
        }
        steps, epochs = measure(clients, args.repeats)
    report(args.models, steps, epochs, args)


if __name__ == "__main__":
    main()
