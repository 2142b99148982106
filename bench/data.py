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
import subprocess
import sys
import time
from pathlib import Path

import common  # noqa: F401  (puts the repository on sys.path)
from common import Samples, machine, ratio_line

BATCH = 32


def cached_epoch(root: str, size: int) -> dict:
    import torch

    from pneumonia.data.datamodule import ChestXrayDataModule
    from pneumonia.data.sources import DataConfig, load_images
    from pneumonia.data.transforms import AugmentConfig, random_affine

    start = time.perf_counter()
    train = load_images(DataConfig(root=root, image_size=size), seed=0)["train"]
    loaded = time.perf_counter()
    augment = AugmentConfig()
    loader = ChestXrayDataModule(train, None, batch_size=BATCH, augment=augment)
    images = 0
    for x, y in loader.train_dataloader():
        x = random_affine(x.float() / 255.0, augment)
        images += len(y)
    end = time.perf_counter()
    assert x.shape[1:] == (1, size, size) and x.dtype == torch.float32
    return {"seconds": end - start, "load_seconds": loaded - start, "images": images}


def imagefolder_epoch(root: str, size: int, workers: int, limit: int) -> dict:
    import torch
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    transform = transforms.Compose(
        [
            transforms.Grayscale(1),
            transforms.Resize((size, size)),
            transforms.RandomAffine(10, translate=(0.08, 0.08), scale=(0.9, 1.1)),
            transforms.PILToTensor(),
        ]
    )
    start = time.perf_counter()
    dataset = datasets.ImageFolder(root, transform=transform)
    if limit:  # every k-th file: both classes, the same share of each
        dataset = Subset(dataset, range(0, len(dataset), max(len(dataset) // limit, 1)))
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers)
    images = 0
    for x, y in loader:
        x = x.float() / 255.0
        images += len(y)
    end = time.perf_counter()
    assert x.shape[1:] == (1, size, size) and x.dtype == torch.float32
    return {"seconds": end - start, "load_seconds": 0.0, "images": images}


def child(args: argparse.Namespace) -> None:
    """One measurement in this fresh process; prints one JSON line."""
    if args.child == "cache":
        out = cached_epoch(args.root, args.size)
    else:
        out = imagefolder_epoch(args.root, args.size, args.workers, args.limit)
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kb_workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps(out | {"peak_mb": kb / 1024, "peak_worker_mb": kb_workers / 1024}))


def measure(which: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", which, "--root", args.root]
    cmd += ["--size", str(args.size), "--workers", str(args.workers), "--limit", str(args.limit)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode:
        sys.exit(f"{which} measurement failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def cache_file_size(root: str, size: int) -> tuple[float, int]:
    """(MB on disk, images) of the cache at `size`, decoding it first if need be."""
    from pneumonia.data.cache import default_cache_dir
    from pneumonia.data.sources import DataConfig, load_images

    n = len(load_images(DataConfig(root=root, image_size=size), seed=0)["train"])
    files = sorted(
        default_cache_dir().glob(f"images-{size}px-*.pt"), key=lambda p: p.stat().st_mtime
    )
    return files[-1].stat().st_size / 1e6, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--root", required=True, help="a Kermany train folder (NORMAL/, PNEUMONIA/)"
    )
    parser.add_argument("--size", type=int, default=64, help="image size of the epoch comparison")
    parser.add_argument("--workers", type=int, default=2, help="ImageFolder loader processes")
    parser.add_argument("--limit", type=int, default=0, help="ImageFolder: about this many files")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache_size", type=int, default=224, help="0: skip the size check")
    parser.add_argument("--child", choices=["cache", "imagefolder"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not (Path(args.root) / "NORMAL").is_dir():
        sys.exit(f"--root {args.root}: no NORMAL/ folder there; pass a Kermany train folder")
    if args.child:
        return child(args)
    print(machine())
    measure("cache", args)  # fills the cache at --size if this is its first use
    ours, theirs, rates = Samples("s"), Samples("s"), []
    for _ in range(args.repeats):
        a, b = measure("cache", args), measure("imagefolder", args)
        ours.add(a["seconds"])
        theirs.add(b["seconds"])
        # Per image: --limit may give the baseline fewer images than ours.
        rates.append((b["seconds"] / b["images"]) / (a["seconds"] / a["images"]))
    print(f"{args.size} px, batch {BATCH}, random affine augmentation")
    print(
        f"cache epoch ({a['images']} images, cache load {a['load_seconds']:.2f} s of it): {ours}, "
        f"peak memory {a['peak_mb']:.0f} MB"
    )
    print(
        f"ImageFolder + PIL epoch ({b['images']} images, {args.workers} workers): {theirs}, "
        f"peak memory {b['peak_mb']:.0f} MB + workers {b['peak_worker_mb']:.0f} MB each"
    )
    speedup = sorted(rates)[len(rates) // 2]
    print(ratio_line("speed-up per image, median", speedup, ">= 10", speedup >= 10))
    if args.cache_size:
        mb, n = cache_file_size(args.root, args.cache_size)
        print(ratio_line(f"{args.cache_size} px cache of {n} images, MB", mb, "< 300", mb < 300))


if __name__ == "__main__":
    main()
