"""What every benchmark shares: the machine line, repeated timings and their summary.

Benchmarks print figures measured side by side in one process run, so a ratio compares
like with like on a shared, noisy machine; absolute figures are for the docs' record.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/x.py` from a clone without `pip install -e`
    sys.path.insert(0, str(ROOT))
import lightning  # noqa: E402, F401  (sets its loggers' levels on import: override after it)

# Benchmarks print figures; Lightning's banners and tips would bury them.
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", module="lightning")
warnings.filterwarnings("ignore", module="torch")


def machine() -> str:
    """One line: date, device (a CPU's model and whether it has native bf16), cores, thread
    count and library versions."""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        from pneumonia.run.config import native_cpu_bf16

        bf16 = "native bf16" if native_cpu_bf16() else "no native bf16 (AVX512-BF16 or AMX)"
        device = f"CPU {cpu_model()}, {bf16}, no GPU"
    return (
        f"{date.today()} | {device} | {os.cpu_count()} cores, torch threads "
        f"{torch.get_num_threads()} | torch {torch.__version__}, Python {platform.python_version()}"
    )


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    """Wait for queued GPU work, so a clock reading covers it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Samples:
    """Repeated measurements of one quantity: median and spread (min-max)."""

    def __init__(self, unit: str) -> None:
        self.unit, self.values = unit, []

    def add(self, value: float) -> None:
        self.values.append(value)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def __str__(self) -> str:
        lo, hi = min(self.values), max(self.values)
        return f"{self.median:.3g} {self.unit} (min {lo:.3g}, max {hi:.3g}, n={len(self.values)})"


def ratio_line(name: str, value: float, goal: str, met: bool) -> str:
    return f"{name}: {value:.3f} (goal {goal}: {'met' if met else 'NOT met'})"


def run_fit(argv: list[str]) -> tuple[float, dict]:
    """(seconds, summary) of one `python -m pneumonia.fit` run, its report lines silenced."""
    from pneumonia import fit

    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        summary = fit.run(argv)
    return time.perf_counter() - start, summary


def train_images(run_dir: Path) -> int:
    """Training images of a fit run, from its split.csv."""
    rows = (run_dir / "split.csv").read_text().splitlines()
    return sum(row.startswith("train,") for row in rows)
