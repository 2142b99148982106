"""Training throughput: our Lightning training against a plain PyTorch loop, in float32 and
bf16 autocast (and, with --compile, a torch.compile'd plain loop).

Both train the same SE-ResNet-18 (GN and BN) on the same uint8 tensors, at the same batch size
and precision, with the same optimizer and class-weighted loss. Our side is what `fit` builds:
`build_module`, `build_datamodule`, `build_trainer` (TensorBoard and CSV loggers, checkpoints,
metrics) with `--trainer.precision P`; the plain loop autocasts to bf16 for bf16-mixed.
Steady-state images per second are timed from the end of the warm-up steps to the end of the
last step, so start-up (which `bench/federated.py` covers) and compilation stay out (the
compiled loop's first step, which compiles, is reported on its own). Every variant runs once
per repeat and the order reverses between repeats, so drift on a shared machine hits all alike.
The machine line names the CPU and whether it has native bf16: on a CPU without it, `fit`
trains bf16-mixed in 32-true, and the bf16 figures here are torch's emulation.

    python bench/train_step.py                       # 64 and 128 px, GN and BN, batch 32,
                                                     # 32-true and bf16-mixed (CUDA: the same)
    python bench/train_step.py --sizes 224 --precisions bf16-mixed
    python bench/train_step.py --compile             # plus torch.compile(model), inductor
    python bench/train_step.py --channels_last       # plus the plain loop in NHWC on a CPU
    python bench/train_step.py --sizes 64 --profile  # plus the profiler's top operators

Goals: Lightning / plain >= 0.95 (each precision); the bf16-mixed / 32-true and compiled /
eager ratios are measured, for choosing: bf16-mixed is worth setting where it is > 1.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path
from unittest import mock

import common  # noqa: F401  (puts the repository on sys.path)
import lightning as L
import torch
import torch.nn.functional as F
from common import Samples, device, machine, ratio_line, sync

from pneumonia.core.errors import exit_on_user_error, first_line
from pneumonia.data.imageset import ImageSet
from pneumonia.data.sources import Splits
from pneumonia.models.factory import ModelConfig, create_model
from pneumonia.run import config
from pneumonia.run.centralized import build_datamodule, build_trainer
from pneumonia.run.config import build_fit_parser, parse_args
from pneumonia.training.optimizers import make_optimizer
from pneumonia.training.recipe import build_module, loss_weights, make_recipe


def random_images(n: int, size: int, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    names = [f"img{i}" for i in range(n)]
    return ImageSet(images, labels, names, names)


PRECISIONS = ("32-true", "bf16-mixed")


def fit_config(norm: str, size: int, batch: int, width: int, augment: bool, precision: str):
    """The fit configuration both loops follow: one epoch, no validation."""
    parser = build_fit_parser()
    argv = ["--model.norm", norm, "--model.width", str(width), "--data.image_size", str(size)]
    argv += ["--trainer.precision", precision]
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


def plain_rate(
    cfg, splits: Splits, warmup: int, compiled: bool = False, nhwc: bool = False
) -> tuple[float, float]:
    """(images per second, seconds of the first step) of a hand-written loop doing the same
    work, in the config's precision; compiled: torch.compile(model) (default inductor), whose
    first step compiles; nhwc: channels_last on a CPU too."""
    from pneumonia.data.transforms import random_affine

    torch.manual_seed(0)
    dev = device()
    model = create_model(cfg.model).to(dev).train()
    nhwc = nhwc or dev.type == "cuda"  # as our module does on a GPU
    channels_last = torch.channels_last if nhwc else torch.contiguous_format
    model.to(memory_format=channels_last)
    opt = make_optimizer(model.parameters(), cfg.optim)  # the same optimizer as ours
    if compiled:
        torch._dynamo.reset()  # a fresh compile each repeat, never a cache limit's eager fallback
        forward = torch.compile(model)
    else:
        forward = model
    weight = torch.ones(2, device=dev)
    mean, std = splits.train.pixel_mean_std()
    images, labels = splits.train.images, splits.train.labels
    order = torch.randperm(len(labels))
    batch, done, start, first_step = cfg.data.batch_size, 0, 0.0, 0.0
    bf16 = cfg.trainer.precision == "bf16-mixed"
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)
    began = time.perf_counter()
    for step, first in enumerate(range(0, len(labels) - batch + 1, batch)):
        if step == 1:
            sync()
            first_step = time.perf_counter() - began
        if step == warmup:
            sync()
            start = time.perf_counter()
        idx = order[first : first + batch]
        x, y = images[idx].to(dev, non_blocking=True), labels[idx].to(dev, non_blocking=True)
        x = x.float() / 255.0
        if cfg.data.augment.enabled:
            x = random_affine(x, cfg.data.augment)
        with autocast:
            logits = forward(((x - mean) / std).contiguous(memory_format=channels_last))
        loss = F.cross_entropy(logits.float(), y, weight=weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done += len(y) if step >= warmup else 0
    sync()
    return done / (time.perf_counter() - start), first_step


@contextlib.contextmanager
def bf16_as_asked():
    """fit's Trainer in bf16-mixed even on a CPU without native bf16 (where `fit` itself trains
    in 32-true: `config.cpu_precision`), so that the bench measures what the fallback avoids."""
    with mock.patch.object(config, "native_cpu_bf16", lambda: True):
        yield


def ratio_text(top: Samples, bottom: Samples) -> tuple[float, str]:
    """The median of the per-repeat ratios, and it in words with every repeat's."""
    ratios = [a / b for a, b in zip(top.values, bottom.values, strict=True)]
    ratio = sorted(ratios)[len(ratios) // 2]
    return ratio, f"median {ratio:.3f} (per repeat {', '.join(f'{x:.3f}' for x in ratios)})"


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--norms", nargs="+", default=["gn", "bn"])
    parser.add_argument(
        "--precisions",
        nargs="+",
        choices=PRECISIONS,
        default=list(PRECISIONS),
        help="trainer.precision of both loops (the plain one autocasts to bf16 for bf16-mixed)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="plus the plain loop with torch.compile(model) (default inductor backend)",
    )
    parser.add_argument(
        "--channels_last",
        action="store_true",
        help="plus the plain loop in channels_last on a CPU (on CUDA both loops always are)",
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--steps", type=int, default=0, help="timed steps (0: 20 up to 128 px, 6 above)"
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's own)")
    parser.add_argument("--width", type=int, default=ModelConfig.width)
    parser.add_argument("--augment", action="store_true", help="batched augmentation in both")
    parser.add_argument("--profile", action="store_true", help="profile one Lightning run")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    precisions = list(dict.fromkeys(args.precisions))
    print(machine())
    print(
        f"batch {args.batch}, {args.repeats} repeats, warm-up {args.warmup} steps, "
        f"augmentation {'on' if args.augment else 'off'}, precisions {', '.join(precisions)}"
    )
    if "bf16-mixed" in precisions and device().type == "cpu" and not config.native_cpu_bf16():
        print(
            "this CPU has no native bf16: fit trains bf16-mixed in 32-true; the bf16-mixed "
            "figures below are torch's emulation"
        )
    kinds = ["lightning", "plain"] + ["nhwc"] * args.channels_last + ["compiled"] * args.compile
    compiles = args.compile
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
            name = f"SE-ResNet-18-{norm.upper()} {size} px"
            cfgs = {
                p: fit_config(norm, size, args.batch, args.width, args.augment, p)
                for p in precisions
            }
            variants = [(kind, p) for p in precisions for kind in kinds]
            rates = {variant: Samples("img/s") for variant in variants}
            first_steps = {p: Samples("s") for p in precisions}
            with tempfile.TemporaryDirectory() as tmp, bf16_as_asked():
                for r in range(args.repeats):
                    # Reverse the order every other repeat: a process that slows as it ages
                    # (memory fragmentation, a neighbour's job) must not always hit one side.
                    for kind, p in variants if r % 2 == 0 else variants[::-1]:
                        cfg = cfgs[p]
                        if kind == "lightning":
                            run_dir = Path(tmp) / f"run{r}-{p}"
                            profile = args.profile and r == args.repeats - 1
                            rate = lightning_rate(cfg, splits, args.warmup, run_dir, profile)
                        elif kind == "compiled":
                            if not compiles:
                                continue
                            try:
                                rate, first = plain_rate(cfg, splits, args.warmup, compiled=True)
                            except Exception as err:  # inductor: no C++ compiler, no Triton...
                                print(
                                    f"torch.compile failed on this machine, no compiled "
                                    f"figures: {type(err).__name__}: {first_line(err, 200)}"
                                )
                                compiles = False
                                continue
                            first_steps[p].add(first)
                        else:
                            rate, _ = plain_rate(cfg, splits, args.warmup, nhwc=kind == "nhwc")
                        rates[kind, p].add(rate)
            for p in precisions:
                ours, plain = rates["lightning", p], rates["plain", p]
                ratio, text = ratio_text(ours, plain)
                worst = min(worst, ratio)
                print(f"{name}, {p}: Lightning {ours} | plain {plain} | ratio {text}")
                nhwc = rates.get(("nhwc", p))
                if nhwc is not None:
                    print(
                        f"{name}, {p}: plain channels_last {nhwc} | channels_last/NCHW "
                        f"{ratio_text(nhwc, plain)[1]}"
                    )
                compiled = rates.get(("compiled", p))
                if compiled is not None and len(compiled.values) == args.repeats:
                    # Later repeats' compiles reuse inductor's on-disk cache (as later runs do).
                    compiling = ", ".join(f"{x:.3g}" for x in first_steps[p].values)
                    print(
                        f"{name}, {p}: plain compiled {compiled} | compiled/eager "
                        f"{ratio_text(compiled, plain)[1]} | first step (compiling), each "
                        f"repeat: {compiling} s"
                    )
            if len(precisions) == 2:
                bf16, fp32 = rates["lightning", "bf16-mixed"], rates["lightning", "32-true"]
                print(f"{name}: Lightning bf16-mixed/32-true {ratio_text(bf16, fp32)[1]}")
    print(ratio_line("worst median ratio Lightning/plain", worst, ">= 0.95", worst >= 0.95))


if __name__ == "__main__":
    main()
