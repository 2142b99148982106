"""What each training option of the ResNet review costs: seconds per training step (forward,
backward, optimizer step and scheduler step of the package's own module) against the default
recipe, at the same batch on the same images.

Each repeat times every option once, in a fresh order, after one untimed warm-up step per
option; the ratio is of the medians. The default's step is timed in every repeat too, so each
ratio compares like with like on a shared machine.

    python bench/options.py                 # 64 px, width 64, batch 32, 5 repeats
    python bench/options.py --width 16 --size 32 --batch 8 --repeats 1   # a quick look

Goal (issue 18): flag any option above 1.5x the default's step, and say why.
"""

from __future__ import annotations

import argparse
import random
import time

import common  # noqa: F401  (puts the repository on sys.path)
import torch
from common import Samples, machine

from pneumonia.core.errors import exit_on_user_error
from pneumonia.models.layers import ACTIVATIONS
from pneumonia.training.losses import LOSS_NAMES
from pneumonia.training.optimizers import OPTIMIZER_NAMES
from pneumonia.training.recipe import Recipe, build_module

GOAL = 1.5
# Why an option may cost more than a plain step, for the flagged lines.
WHY = {
    "model.activation maxout": "k-1 rolled copies of every activation map and their maxima",
    "model.activation rrelu": "a random slope drawn per element in training",
    "model.norm brn": "batch statistics plus the clipped corrections r and d, in Python ops",
    "optim.l1": "a pass over every weight for the penalty and its gradient",
    "optim.name adadelta": "torch's foreach update (not fused like AdamW's) over two states",
    "optim.name nadam": "torch's foreach update (not fused) with its momentum-decay terms",
    "model.drop_connect": "a fresh mask over the classifier's weights",
}


def options() -> list[tuple[str, dict]]:
    """(label, the recipe parts it changes) of every option; the default first."""
    out = [("default", {})]
    out += [
        (f"model.activation {a}", {"model": {"activation": a}}) for a in ACTIVATIONS if a != "relu"
    ]
    out += [(f"loss.name {n}", {"loss": {"name": n}}) for n in LOSS_NAMES if n != "cross_entropy"]
    out += [(f"optim.name {n}", {"optim": {"name": n}}) for n in OPTIMIZER_NAMES if n != "adamw"]
    out += [
        ("model.norm bn", {"model": {"norm": "bn"}}),
        ("model.norm brn", {"model": {"norm": "brn"}}),
        ("optim.l1", {"optim": {"l1": 1e-5}}),
        ("model.drop_rate 0.3", {"model": {"drop_rate": 0.3}}),
        ("model.block_drop_rate 0.1", {"model": {"block_drop_rate": 0.1}}),
        ("model.drop_connect", {"model": {"drop_connect": 0.3}}),
    ]
    return out


class Stepper:
    """One option's module and optimizer, stepping on fixed images."""

    def __init__(self, parts: dict, args) -> None:
        model = {"name": "se_resnet18", "norm": "gn", "width": args.width, "gn_groups": 16}
        optim = {"name": "adamw", "lr": 1e-3, "weight_decay": 5e-4, "scheduler": "none"}
        recipe = Recipe(
            model=model | parts.get("model", {}),
            optim=optim | parts.get("optim", {}),
            loss=parts.get("loss", {}),
            image_size=args.size,
        )
        torch.manual_seed(0)
        self.module = build_module(recipe, class_weights=[1.5, 0.75])
        self.module.train()
        self.optimizer = self.module.configure_optimizers()
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (args.batch, 1, args.size, args.size), generator=g)
        self.images = self.images.to(torch.uint8)
        self.labels = torch.randint(0, 2, (args.batch,), generator=g)

    def step(self) -> float:
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.module.training_loss(self.module(self.images), self.labels)
        loss.backward()
        self.optimizer.step()
        return time.perf_counter() - start


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    return parser.parse_args()


@exit_on_user_error
def main() -> None:
    args = parse_args()
    print(machine())
    print(f"SE-ResNet-18 width {args.width}, {args.size} px, batch {args.batch}, CPU step times")
    steppers = {label: Stepper(parts, args) for label, parts in options()}
    for stepper in steppers.values():
        stepper.step()  # warm-up: allocator, first-call dispatch, optimizer state
    times = {label: Samples("s") for label in steppers}
    order = list(steppers)
    for repeat in range(args.repeats):
        random.Random(repeat).shuffle(order)
        for label in order:
            times[label].add(steppers[label].step())
    base = times["default"].median
    flagged = []
    for label, samples in times.items():
        ratio = samples.median / base
        mark = "  FLAG" if ratio > GOAL else ""
        print(f"{label:34s} {samples}  x{ratio:.2f}{mark}")
        if ratio > GOAL:
            flagged.append(f"{label} x{ratio:.2f}: {WHY.get(label, 'see the step time above')}")
    print(f"options above {GOAL}x the default's step: {len(flagged)}")
    for line in flagged:
        print(f"  {line}")


if __name__ == "__main__":
    main()
