"""Data pipeline: one training epoch from our decoded-tensor cache against torchvision's
`ImageFolder` + PIL decoding of the same files, and the size of the 224 px cache.

Both sides deliver what a training step needs: shuffled batches of 1-channel images at
`--size`, randomly rotated, shifted and scaled.
- ours: `load_images` (the cache file, decoded once by an earlier run) and the training
  loader of `ChestXrayDataModule`, with augmentation as one batched `random_affine` call;
- baseline: `ImageFolder` with Grayscale, Resize, RandomAffine and PILToTensor per image, in a
  DataLoader with `--workers` worker processes.
Each measurement runs in a fresh process, which also reports its peak memory (its own and its
loader workers').

    python bench/data.py --root ../shared/data/chest_xray/train

Goals: ours at least 10x faster per epoch; the 224 px cache of the 5,216 images under 300 MB.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common  # noqa: F401  (puts the repository on sys.path)
from common import Samples, machine, ratio_line

from pneumonia.core.errors import exit_on_user_error

BATCH = 32
EPOCHS = 2  # the first pays for loading (ours) or worker start-up; later ones are steady state


def cached_epochs(root: str, size: int, augment: bool) -> dict:
    import torch

    from pneumonia.data.datamodule import ChestXrayDataModule
    from pneumonia.data.sources import DataConfig, load_images
    from pneumonia.data.transforms import AugmentConfig, random_affine

    start = time.perf_counter()
    train = load_images(DataConfig(root=root, image_size=size), seed=0)["train"]
    load = time.perf_counter() - start
    cfg = AugmentConfig(enabled=augment)
    loader = ChestXrayDataModule(train, None, batch_size=BATCH, augment=cfg).train_dataloader()
    epochs = []
    for _ in range(EPOCHS):
        start, images = time.perf_counter(), 0
        for x, y in loader:
            x = x.float() / 255.0
            if augment:  # what the DataModule does to each training batch on the device
                x = random_affine(x, cfg)
            images += len(y)
        epochs.append(time.perf_counter() - start)
    assert x.shape[1:] == (1, size, size) and x.dtype == torch.float32
    return {"load": load, "epochs": epochs, "images": images}


def imagefolder_epochs(root: str, size: int, augment: bool, workers: int, limit: int) -> dict:
    import torch
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    steps = [transforms.Grayscale(1), transforms.Resize((size, size))]
    if augment:
        steps.append(transforms.RandomAffine(10, translate=(0.08, 0.08), scale=(0.9, 1.1)))
    dataset = datasets.ImageFolder(
        root, transform=transforms.Compose(steps + [transforms.PILToTensor()])
    )
    if limit:  # every k-th file: both classes, the same share of each
        dataset = Subset(dataset, range(0, len(dataset), max(len(dataset) // limit, 1)))
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers)
    epochs = []
    for _ in range(EPOCHS):
        start, images = time.perf_counter(), 0
        for x, y in loader:
            x = x.float() / 255.0
            images += len(y)
        epochs.append(time.perf_counter() - start)
    assert x.shape[1:] == (1, size, size) and x.dtype == torch.float32
    return {"load": 0.0, "epochs": epochs, "images": images}


def child(args: argparse.Namespace) -> None:
    """One measurement in this fresh process; prints one JSON line."""
    augment = not args.no_augment
    if args.child == "cache":
        out = cached_epochs(args.root, args.size, augment)
    else:
        out = imagefolder_epochs(args.root, args.size, augment, args.workers, args.limit)
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kb_workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps(out | {"peak_mb": kb / 1024, "peak_worker_mb": kb_workers / 1024}))


def measure(which: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", which, "--root", args.root]
    cmd += ["--size", str(args.size), "--workers", str(args.workers), "--limit", str(args.limit)]
    cmd += ["--no_augment"] if args.no_augment else []
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode:
        sys.exit(f"{which} measurement failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def cache_file_size(root: str, size: int) -> tuple[float, int]:
    """(MB on disk, images) of the cache at `size`, decoding it first if need be."""
    from pneumonia.core.caches import default_cache_dir
    from pneumonia.data.cache import cache_path
    from pneumonia.data.kermany import find_splits, list_image_files
    from pneumonia.data.sources import DataConfig, load_images

    n = len(load_images(DataConfig(root=root, image_size=size), seed=0)["train"])
    files = list_image_files(find_splits(root)["train"])
    return cache_path(files, size, default_cache_dir()).stat().st_size / 1e6, n


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--root", required=True, help="a Kermany train folder (NORMAL/, PNEUMONIA/)"
    )
    parser.add_argument("--size", type=int, default=64, help="image size of the epoch comparison")
    parser.add_argument("--workers", type=int, default=2, help="ImageFolder loader processes")
    parser.add_argument("--limit", type=int, default=0, help="ImageFolder: about this many files")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no_augment", action="store_true", help="decode and batch only")
    parser.add_argument("--cache_size", type=int, default=224, help="0: skip the size check")
    parser.add_argument("--child", choices=["cache", "imagefolder"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not (Path(args.root) / "NORMAL").is_dir():
        sys.exit(f"--root {args.root}: no NORMAL/ folder there; pass a Kermany train folder")
    if args.child:
        return child(args)
    print(machine())
    from pneumonia.data.sources import DataConfig, load_images

    load_images(DataConfig(root=args.root, image_size=args.size), seed=0)  # fill the cache
    first, later, theirs = Samples("s"), Samples("s"), Samples("s")
    first_ratio, later_ratio = [], []
    for _ in range(args.repeats):
        a, b = measure("cache", args), measure("imagefolder", args)
        first.add(a["load"] + a["epochs"][0])
        later.add(a["epochs"][-1])
        theirs.add(b["epochs"][-1])
        # Per image: --limit may give the baseline fewer images than ours.
        per_image = b["epochs"][-1] / b["images"]
        first_ratio.append(per_image / ((a["load"] + a["epochs"][0]) / a["images"]))
        later_ratio.append(per_image / (a["epochs"][-1] / a["images"]))
    augmentation = "no augmentation" if args.no_augment else "random affine augmentation"
    print(f"{args.size} px, batch {BATCH}, {augmentation}")
    print(f"cache, first epoch incl. loading the cache file ({a['images']} images): {first}")
    print(f"cache, each later epoch: {later}; peak memory {a['peak_mb']:.0f} MB")
    print(
        f"ImageFolder + PIL, every epoch ({b['images']} images, {args.workers} workers): {theirs}; "
        f"peak memory {b['peak_mb']:.0f} MB, largest worker {b['peak_worker_mb']:.0f} MB"
    )
    for name, ratios in (("first", first_ratio), ("later", later_ratio)):
        r = statistics.median(ratios)
        print(ratio_line(f"speed-up per image, {name} epoch, median", r, ">= 10", r >= 10))
    if args.cache_size:
        mb, n = cache_file_size(args.root, args.cache_size)
        print(ratio_line(f"{args.cache_size} px cache of {n} images, MB", mb, "< 300", mb < 300))


if __name__ == "__main__":
    main()
