"""The paper's full protocol on one GPU: FL-SE-ResNet-18-GN, 3 IID clients, 20 rounds x 10 local
epochs at 224 px, with the global model evaluated after every round.

It is `python -m pneumonia.fit --config configs/fl_se_resnet_gn.yaml` (bf16 mixed precision,
channels_last, augmentation on the GPU), timed end to end, while a thread samples the GPU's
utilisation and memory with nvidia-smi once a second.

    python bench/paper_protocol.py --root ../shared/data/chest_xray/train
    python bench/paper_protocol.py --root DIR --federated.rounds 2   # any fit option

Goal: the whole protocol in at most 10 minutes on one H100.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import common
import torch
import yaml
from common import machine, ratio_line, run_fit, train_images

from pneumonia.core.errors import exit_on_user_error

GOAL_S = 600


class GpuSampler(threading.Thread):
    """Samples (utilisation %, memory MiB) of GPU 0 every `period` seconds until stopped."""

    def __init__(self, period: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.period, self.samples, self.done = period, [], threading.Event()

    def run(self) -> None:
        query = [
            "nvidia-smi",
            "--query-gpu=utilization.gpu,memory.used",
            "--format=csv,noheader,nounits",
        ]
        while not self.done.wait(self.period):
            out = subprocess.run(query, capture_output=True, text=True, check=False).stdout
            if out.strip():
                util, mem = out.splitlines()[0].split(",")
                self.samples.append((float(util), float(mem)))

    def summary(self) -> str:
        if not self.samples:
            return "no nvidia-smi samples"
        util = [u for u, _ in self.samples]
        return (
            f"GPU utilisation mean {statistics.mean(util):.0f}%, "
            f"median {statistics.median(util):.0f}% ({len(util)} samples), "
            f"peak memory {max(m for _, m in self.samples):.0f} MiB"
        )


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="the Kermany train folder")
    parser.add_argument("--config", default=str(common.ROOT / "configs" / "fl_se_resnet_gn.yaml"))
    parser.add_argument("--allow_cpu", action="store_true", help="run without a GPU (smoke test)")
    args, overrides = parser.parse_known_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        sys.exit("no CUDA GPU here: this benchmark is for a GPU (--allow_cpu runs it anyway)")
    print(machine())
    sampler = GpuSampler()
    if torch.cuda.is_available() and shutil.which("nvidia-smi"):
        sampler.start()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        argv = ["--config", args.config, "--data.root", args.root, "--run_dir", str(run_dir)]
        argv += ["--trainer.enable_progress_bar", "false", *overrides]
        try:
            wall, summary = run_fit(argv)
        finally:
            sampler.done.set()
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        train = train_images(run_dir)
    fed = config["federated"]
    # Every client trains every round (C = 1 in the paper), so each epoch passes the whole set.
    images = train * fed["rounds"] * fed["local_epochs"] * fed["fraction"]
    print(
        f"{fed['clients']} clients x {fed['rounds']} rounds x {fed['local_epochs']} local epochs, "
        f"{config['data']['image_size']} px, batch {config['data']['batch_size']}, "
        f"{train} training images, precision {config['trainer'].get('precision') or 'default'}"
    )
    print(
        f"wall time {wall:.0f} s ({wall / 60:.1f} min); "
        f"{images / wall:.0f} training images/s overall"
    )
    print(sampler.summary())
    val = summary["val"]
    print(
        f"best round {summary['best_round']}: "
        f"val accuracy {val['accuracy']:.3f}, AUROC {val['auroc']:.3f}"
    )
    print(ratio_line("minutes for the protocol", wall / 60, "<= 10", wall <= GOAL_S))


if __name__ == "__main__":
    main()
