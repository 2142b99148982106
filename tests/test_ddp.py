"""A central run on several processes (Lightning's DDP, 2 CPU processes over gloo): the same
figures as one process with the same global batch, one run directory written by process 0,
SIGTERM and --resume with both processes; what it cannot do, refused in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pneumonia.core import ranks
from pneumonia.core.errors import UserError
from pneumonia.data.datamodule import RankShard
from pneumonia.run.config import parse_fit_config
from pneumonia.run.job import preflight
from pneumonia.run.rundir import run_directory

ROOT = Path(__file__).parents[1]
# 90 training images in global batches of 16: every batch splits evenly over 2 processes.
# Class-weighted loss (the default balance), no augmentation (each process would draw its own).
TINY = [
    "--federated.enabled", "false",
    "--trainer.accelerator", "cpu",
    "--data.image_size", "32",
    "--model.width", "16",
    "--data.synthetic.n_patients", "60",
    "--data.batch_size", "16",
    "--data.augment.enabled", "false",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]  # fmt: skip
DDP = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
# Float summation order differs (gradients all-reduced, metric states gathered): figures agree
# to about 1e-7 in float32, float64 losses closer still.
TOLERANCE = 1e-5


def fit(argv: list[str], tiny: bool = True) -> subprocess.Popen:
    """`python -m pneumonia.fit` in its own process: Lightning starts process 1 as a copy of
    the command line, which must be the fit's, not pytest's."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", ranks.RUN_DIR_ENV):
        env.pop(key, None)
    return subprocess.Popen(
        [sys.executable, "-m", "pneumonia.fit", *(TINY if tiny else []), *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finished(argv: list[str], tiny: bool = True) -> str:
    proc = fit(argv, tiny)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return out


def figures(run_dir: Path) -> dict[str, float]:
    """summary.json's numbers, flattened (the run's own path and time left out)."""
    out: dict[str, float] = {}

    def walk(value, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}")
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{key}[{i}]")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = float(value)

    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("wall_time_s", "run_dir"):
        summary.pop(key)
    walk(summary, "")
    return out


def assert_same_figures(a: Path, b: Path) -> None:
    fa, fb = figures(a), figures(b)
    assert fa.keys() == fb.keys()
    far = {k: (fa[k], fb[k]) for k in fa if abs(fa[k] - fb[k]) > TOLERANCE}
    assert not far


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ddp") / "one"
    finished(["--trainer.max_epochs", "3", "--run_dir", str(run_dir)])
    return run_dir


@pytest.mark.slow
def test_two_processes_give_one_processs_figures_in_one_run_directory(one_process, tmp_path):
    run_dir = tmp_path / "two"
    out = finished([*DDP, "--trainer.max_epochs", "3", "--run_dir", str(run_dir)])
    assert "Starting with 2 processes" in out
    assert_same_figures(one_process, run_dir)
    assert out.count("summary: ") == 1  # process 1 prints none of the run's lines
    # One writer: one events file per logger version, as one process leaves.
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == len(
        list(one_process.glob("events.out.tfevents.*"))
    )
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert len(rows) == len((one_process / "metrics.csv").read_text().splitlines())


@pytest.mark.slow
def test_sigterm_stops_both_processes_and_the_run_resumes_on_two(one_process, tmp_path):
    run_dir = tmp_path / "stopped"
    proc = fit([*DDP, "--trainer.max_epochs", "3", "--run_dir", str(run_dir)])
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not last.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-3000:]
    assert "interrupted by SIGTERM" in out and f"--resume {run_dir}" in out
    assert not (run_dir / "summary.json").exists()
    out = finished(["--resume", str(run_dir)], tiny=False)  # its config.yaml: 2 devices
    assert "Starting with 2 processes" in out
    assert_same_figures(one_process, run_dir)


def test_rank_shards_cover_each_batch_once():
    batches = [[0, 1, 2, 3, 4], [5, 6], [7]]
    shards = [list(RankShard(batches, rank, 2)) for rank in (0, 1)]  # type: ignore[arg-type]
    assert shards == [[[0, 1, 2], [5], [7]], [[3, 4], [6], []]]
    assert len(RankShard(batches, 1, 2)) == 3  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("env", "primary"),
    [
        ({}, True),
        ({"RANK": "0"}, True),
        ({"RANK": "3"}, False),
        ({"LOCAL_RANK": "1", "NODE_RANK": "0"}, False),
        ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False),
        ({"LOCAL_RANK": "0", "NODE_RANK": "0"}, True),
        ({"SLURM_PROCID": "1"}, False),
        # A one-task SLURM job: Lightning's copies inherit SLURM_PROCID 0.
        ({"SLURM_PROCID": "0", "LOCAL_RANK": "1"}, False),
    ],
)
def test_the_primary_process_is_read_from_the_launchers_environment(monkeypatch, env, primary):
    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert ranks.is_primary() is primary


def config(*argv: str):
    return parse_fit_config([*TINY, *argv])[0]


def test_a_copy_takes_process_0s_run_directory_and_creates_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv(ranks.RUN_DIR_ENV, str(tmp_path / "given"))
    with run_directory(config("--runs_root", str(tmp_path / "runs"))) as path:
        assert path == tmp_path / "given"
    assert not (tmp_path / "runs").exists() and not path.exists()


def test_processes_started_together_need_a_run_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv(ranks.RUN_DIR_ENV, raising=False)
    with (
        pytest.raises(UserError, match="needs --run_dir"),
        run_directory(config("--runs_root", str(tmp_path))),
    ):
        pass


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--federated.enabled", "true"], "federated run trains each client on one device"),
        (["--privacy.enabled", "true"], "privacy.enabled trains on one device"),
        (["--trainer.strategy", "ddp_spawn"], "use ddp"),
        (["--data.batch_size", "1"], "global batch"),
    ],
)
def test_what_several_processes_cannot_do_is_refused_in_one_line(argv, message, tmp_path):
    devices = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
    cfg = config(*devices, *argv, "--runs_root", str(tmp_path))
    with pytest.raises(UserError, match=message) as err:
        preflight(cfg)
    assert "\n" not in str(err.value)
    assert not torch.distributed.is_initialized()
