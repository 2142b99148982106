"""Training throughput: our Lightning training against a plain PyTorch loop.

Both train the same SE-ResNet-18 (GN and BN) on the same uint8 tensors, at the same batch size
and precision, with the same optimizer and class-weighted loss. Our side is what `fit` builds:
`build_module`, `build_datamodule`, `build_trainer` (TensorBoard and CSV loggers, checkpoints,
metrics). Steady-state images per second are timed from the end of the warm-up steps to the
end of the last step, so start-up (which `bench/federated.py` covers) stays out. The two loops
alternate within each repeat, and which goes first alternates between repeats, so drift on a
shared machine hits both alike.

    python bench/train_step.py                       # 64 and 224 px, GN and BN, batch 32
    python bench/train_step.py --sizes 64 --profile  # plus the profiler's top operators

Goal: Lightning / plain >= 0.95.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (puts the repository on sys.path)
import lightning as L
import torch
import torch.nn.functional as F
from common import Samples, device, machine, ratio_line, sync

from pneumonia.config import build_fit_parser, parse_args
from pneumonia.data.imageset import ImageSet
from pneumonia.data.sources import Splits
from pneumonia.errors import exit_on_user_error
from pneumonia.models.registry import ModelConfig, create_model
from pneumonia.optimizers import make_optimizer
from pneumonia.recipe import build_module, loss_weights, make_recipe
from pneumonia.run.centralized import build_datamodule, build_trainer


def random_images(n: int, size: int, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    names = [f"img{i}" for i in range(n)]
    return ImageSet(images, labels, names, names)


def fit_config(norm: str, size: int, batch: int, width: int, augment: bool):
    """The fit configuration both loops follow: one epoch, no validation."""
    parser = build_fit_parser()
    argv = ["--model.norm", norm, "--model.width", str(width), "--data.image_size", str(size)]
    argv += ["--data.batch_size", str(batch), "--data.augment.enabled", str(augment).lower()]
    argv += ["--federated.enabled", "false", "--trainer.max_epochs", "1"]
    argv += ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    argv += ["--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0"]
    return parser.instantiate(parse_args(parser, argv))


class StepClock(L.Callback):
    """Times the training steps after the first `warmup`."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.images = warmup, None, None, 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.warmup:
            sync()
            self.start = time.perf_counter()
        if batch_idx >= self.warmup:
            self.images += len(batch[1])

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        # Only after the last step: a sync every step would stall a GPU's queue, which the
        # plain loop (synchronised once, at its end) does not do either.
        if batch_idx == trainer.num_training_batches - 1:
            sync()
            self.end = time.perf_counter()


def lightning_rate(cfg, splits: Splits, warmup: int, run_dir: Path, profile: bool) -> float:
    """Images per second of `fit`'s own module, data module and Trainer."""
    L.seed_everything(0, verbose=False)
    recipe = make_recipe(cfg, splits.train.classes, [splits.train.pixel_moments()])
    module = build_module(recipe, loss_weights(cfg.data.balance, splits.train))
    datamodule = build_datamodule(cfg, splits)
    trainer, _ = build_trainer(cfg, run_dir)
    clock = StepClock(warmup)
    trainer.callbacks.append(clock)
    if profile:
        with torch.profiler.profile() as prof:
            trainer.fit(module, datamodule)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    else:
        trainer.fit(module, datamodule)
    return clock.images / (clock.end - clock.start)


def plain_rate(cfg, splits: Splits, warmup: int) -> float:
    """Images per second of a hand-written loop doing the same work."""
    from pneumonia.data.transforms import random_affine

    torch.manual_seed(0)
    dev = device()
    model = create_model(cfg.model).to(dev).train()
    channels_last = torch.channels_last if dev.type == "cuda" else torch.contiguous_format
    model.to(memory_format=channels_last)  # as our module does on a GPU
    opt = make_optimizer(model.parameters(), cfg.optim)  # the same optimizer as ours
    weight = torch.ones(2, device=dev)
    mean, std = splits.train.pixel_mean_std()
    images, labels = splits.train.images, splits.train.labels
    order = torch.randperm(len(labels))
    batch, done, start = cfg.data.batch_size, 0, 0.0
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    for step, first in enumerate(range(0, len(labels) - batch + 1, batch)):
        if step == warmup:
            sync()
            start = time.perf_counter()
        idx = order[first : first + batch]
        x, y = images[idx].to(dev, non_blocking=True), labels[idx].to(dev, non_blocking=True)
        x = x.float() / 255.0
        if cfg.data.augment.enabled:
            x = random_affine(x, cfg.data.augment)
        with autocast:
            logits = model(((x - mean) / std).contiguous(memory_format=channels_last))
        loss = F.cross_entropy(logits.float(), y, weight=weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done += len(y) if step >= warmup else 0
    sync()
    return done / (time.perf_counter() - start)


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    parser.add_argument("--norms", nargs="+", default=["gn", "bn"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--steps", type=int, default=0, help="timed steps (0: 20 at 64 px, 6 at 224)"
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--width", type=int, default=ModelConfig.width)
    parser.add_argument("--augment", action="store_true", help="batched augmentation in both")
    parser.add_argument("--profile", action="store_true", help="profile one Lightning run")
    args = parser.parse_args()
    print(machine())
    print(
        f"batch {args.batch}, {args.repeats} repeats, warm-up {args.warmup} steps, "
        f"augmentation {'on' if args.augment else 'off'}"
    )
    worst = float("inf")
    for size in args.sizes:
        steps = args.steps or (20 if size <= 128 else 6)
        splits = Splits(
            random_images(args.batch * (args.warmup + steps), size),
            random_images(args.batch, size, seed=1),
            None,
            "random tensors",
        )
        for norm in args.norms:
            cfg = fit_config(norm, size, args.batch, args.width, args.augment)
            ours, plain = Samples("img/s"), Samples("img/s")
            with tempfile.TemporaryDirectory() as tmp:
                for r in range(args.repeats):
                    run_dir = Path(tmp) / f"run{r}"
                    profile = args.profile and r == args.repeats - 1
                    # Alternate which goes first: a process that slows as it ages (memory
                    # fragmentation, a neighbour's job) must not always hit the same side.
                    for lightning in (r % 2 == 1, r % 2 == 0):
                        if lightning:
                            ours.add(lightning_rate(cfg, splits, args.warmup, run_dir, profile))
                        else:
                            plain.add(plain_rate(cfg, splits, args.warmup))
            ratios = [a / b for a, b in zip(ours.values, plain.values, strict=True)]
            ratio = sorted(ratios)[len(ratios) // 2]
            worst = min(worst, ratio)
            print(
                f"SE-ResNet-18-{norm.upper()} {size} px: Lightning {ours} | plain {plain} | "
                f"ratio median {ratio:.3f} (per repeat {', '.join(f'{x:.3f}' for x in ratios)})"
            )
    print(ratio_line("worst median ratio Lightning/plain", worst, ">= 0.95", worst >= 0.95))


if __name__ == "__main__":
    main()
