"""Using a trained model, timed: `pneumonia.predict` against a plain loop, and `pneumonia.serve`'s
latency against the bare forward pass.

    python bench/predict_serve.py [--root ../shared/data/chest_xray/train] [--images 1000]

1. predict: `predict_files` (threads decode while the model scores the previous batch) on
   --images files at --size px, against a plain loop over the same files (decode each file,
   then one forward pass per batch of the same size); images per second and their ratio
   (goal >= 0.9). Best of --repeats runs each, alternating.
2. serve: `python -m pneumonia.serve` in its own process, one --size px JPEG posted
   --requests times one after another, then by 4 concurrent clients; median and 95th
   percentile latency, with and without the Grad-CAM overlay, against the bare forward pass
   and the same work in this process (`serve.app.answer`: decode, forward, Grad-CAM, overlay,
   PNGs, base64): the difference is what the server adds (HTTP, multipart, the hand-off to a
   worker thread, JSON).

The model is an untrained SE-ResNet-18-GN (width 64): speed does not depend on the weights.
Without --root (or when the folder is missing) it writes synthetic JPEGs of Kermany's typical
size. Run it alone: another torch process on the machine halves every figure.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pneumonia.data.decode import decode_file
from pneumonia.inference.predictor import Predictor, predict_files
from pneumonia.serve.app import answer
from pneumonia.training.checkpoint import write_checkpoint
from pneumonia.training.recipe import Recipe, build_module

PAPER_MODEL = {"name": "se_resnet18", "norm": "gn", "gn_groups": 16, "se_reduction": 16,
               "width": 64, "drop_rate": 0.0, "pretrained": None}  # fmt: skip


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="../shared/data/chest_xray/train")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--width", type=int, default=64, help="model.width (tests: 16)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all)"
    )
    parser.add_argument(
        "--upscale",
        action="store_true",
        help="time predict on the images re-saved at 1500x1200 (the originals' usual size; the "
        "shared copy is 224 px), where decoding costs as much as the forward pass",
    )
    return parser.parse_args()


def image_files(root: str, count: int, folder: Path) -> tuple[list[Path], str]:
    """`count` radiographs: the first of each class folder in turn, or synthetic JPEGs."""
    classes = [Path(root) / c for c in ("NORMAL", "PNEUMONIA")]
    if all(c.is_dir() for c in classes):
        lists = [sorted(c.iterdir()) for c in classes]
        files = [f for pair in zip(*lists, strict=False) for f in pair][:count]
        return files, f"{len(files)} Kermany training images from {root}"
    rng = np.random.default_rng(0)
    files = []
    for i in range(count):
        pixels = rng.integers(0, 255, (1200, 1500), dtype=np.uint8)
        files.append(folder / f"synthetic_{i:04d}.jpeg")
        Image.fromarray(pixels).save(files[-1], quality=90)
    return files, f"{count} synthetic 1500x1200 JPEGs (no folder at {root})"


def upscaled(files: list[Path], folder: Path) -> list[Path]:
    """Each file as a 1500x1200 JPEG (quality 90), as the Kermany originals mostly are."""
    out = []
    for i, path in enumerate(files):
        out.append(folder / f"large_{i:04d}.jpeg")
        Image.open(path).convert("L").resize((1500, 1200), Image.BILINEAR).save(out[-1], quality=90)
    return out


def checkpoint(folder: Path, size: int, width: int) -> Path:
    torch.manual_seed(0)
    recipe = Recipe(model=PAPER_MODEL | {"width": width}, optim={}, image_size=size)
    path = folder / "best.ckpt"
    write_checkpoint(path, build_module(recipe).state_dict(), recipe, 1)
    return path


def plain_loop(predictor: Predictor, files: list[Path], batch: int) -> None:
    """What a user would write: decode every file, then the forward pass batch by batch."""
    module, size = predictor.module, predictor.model.image_size
    with torch.inference_mode():
        for start in range(0, len(files), batch):
            images = torch.stack([decode_file(f, size) for f in files[start : start + batch]])
            module.positive_probability(module(images))


def best_rate(run, count: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return count / min(times)


def bench_predict(predictor: Predictor, files: list[Path], args) -> None:
    rates = {"predict": [], "plain": []}
    for _ in range(args.repeats):  # alternate, so drift in the machine's speed hits both
        rates["predict"].append(
            best_rate(lambda: predict_files(predictor, files, args.batch, False), len(files), 1)
        )
        rates["plain"].append(
            best_rate(lambda: plain_loop(predictor, files, args.batch), len(files), 1)
        )
    ours, plain = max(rates["predict"]), max(rates["plain"])
    print(f"\n## predict, {len(files)} images at {args.size} px, batch {args.batch}\n")
    print("| | images/s |\n|---|---|")
    print(f"| pneumonia.predict (predict_files) | {ours:.1f} |")
    print(f"| plain loop: decode, then forward per batch | {plain:.1f} |")
    verdict = "met" if ours / plain >= 0.9 else "NOT met"
    print(f"\npredict / plain: {ours / plain:.2f} (goal >= 0.9: {verdict})")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: bytes, boundary: str) -> float:
    request = urllib.request.Request(
        url, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        response.read()
        assert response.status == 200
    return time.perf_counter() - started


def multipart(path: Path, boundary: str) -> bytes:
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"'
        "\r\nContent-Type: image/jpeg\r\n\r\n"
    ).encode()
    return head + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()


def upload(path: Path, size: int, folder: Path) -> Path:
    """The radiograph at `path` as a `size` px square JPEG: what the serve rows post."""
    pixels = decode_file(path, size)[0].numpy()
    target = folder / f"xray_{size}px.jpeg"
    Image.fromarray(pixels).save(target, quality=90)
    return target


def in_process(predictor: Predictor, path: Path, repeats: int) -> dict[str, list[float]]:
    """Seconds per call in this process: the forward pass alone, and all that POST /predict
    computes (`serve.app.answer`: decode, forward, Grad-CAM, overlay, two PNGs, base64)."""
    image, data = decode_file(path, predictor.model.image_size)[None], path.read_bytes()
    steps = {
        "forward": lambda: predictor.probabilities(image),
        "answer, cam=true": lambda: answer(predictor, data, path.name, True),
        "answer, cam=false": lambda: answer(predictor, data, path.name, False),
    }
    for _ in range(5):  # warm up: the decode threads' OpenMP teams linger for a moment
        steps["answer, cam=true"]()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - started)
    return times


def bench_serve(ckpt: Path, predictor: Predictor, path: Path, args) -> None:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "pneumonia.serve", "--ckpt", str(ckpt), "--port", str(port)],
        stdout=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(base, server)
        boundary = "benchboundary"
        body = multipart(path, boundary)
        latencies = {}
        for cam in ("true", "false"):
            url = f"{base}/predict?cam={cam}"
            post(url, body, boundary)  # warm-up
            latencies[f"sequential, cam={cam}"] = [
                post(url, body, boundary) for _ in range(args.requests)
            ]
        url = f"{base}/predict?cam=true"
        with ThreadPoolExecutor(4) as pool:
            latencies["4 concurrent clients, cam=true"] = list(
                pool.map(lambda _: post(url, body, boundary), range(args.requests))
            )
    finally:
        server.terminate()
        server.wait(timeout=30)
    bare = in_process(predictor, path, args.requests // 2 or 1)
    print(f"\n## serve, one {path.name} at {args.size} px, {args.requests} requests per row\n")
    print("| | median ms | p95 ms |\n|---|---|---|")
    for name, values in {**latencies, **{f"in process: {k}": v for k, v in bare.items()}}.items():
        print(f"| {name} | {1000 * statistics.median(values):.1f} | "
              f"{1000 * percentile(values, 95):.1f} |")  # fmt: skip
    for cam in ("true", "false"):
        added = statistics.median(latencies[f"sequential, cam={cam}"]) - statistics.median(
            bare[f"answer, cam={cam}"]
        )
        print(
            f"\nwhat the server adds per request (median, cam={cam}; HTTP, multipart, thread "
            f"hand-off, JSON over the same work in process): {1000 * added:.1f} ms"
        )


def wait_for(base: str, server: subprocess.Popen, limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit("the server exited before answering")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise SystemExit("the server did not answer /health")


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files, source = image_files(args.root, args.images, folder)
        if args.upscale:
            files, source = upscaled(files, folder), source + ", re-saved at 1500x1200"
        ckpt = checkpoint(folder, args.size, args.width)
        predictor = Predictor.from_checkpoint(ckpt)
        print(f"# predict and serve: SE-ResNet-18-GN width {args.width}, {source}, "
              f"{torch.get_num_threads()} torch threads")  # fmt: skip
        bench_predict(predictor, files, args)
        if args.requests:
            bench_serve(ckpt, predictor, upload(files[0], args.size, folder), args)


if __name__ == "__main__":
    main()
