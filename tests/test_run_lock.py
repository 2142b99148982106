"""One process writes a run directory at a time: a second `fit` (resuming it, or starting in
it) is refused in one line naming the directory and the holder, and leaves every file as it
was; the lock goes with the process that held it, however that process ends."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from pneumonia import fit
from pneumonia.run.config import parse_fit_config
from pneumonia.run.rundir import LOCK, locked

ROOT = Path(__file__).parents[1]
SMALL = [
    "--data.image_size", "32",
    "--data.synthetic.n_patients", "30",
    "--model.name", "resnet18",
    "--model.width", "16",
    "--federated.enabled", "false",
]  # fmt: skip
HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(120)
"""


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run directory as a run writing it leaves it early on: its config.yaml."""
    path = tmp_path / "run"
    path.mkdir()
    (path / "config.yaml").write_text(parse_fit_config(SMALL)[1])
    return path


@pytest.fixture
def holder(run_dir):
    """Another process holding the run directory's lock, as a running fit does."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir / LOCK)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait(timeout=30)


def test_a_resume_of_a_run_another_process_writes_is_refused(run_dir, holder):
    before = snapshot(run_dir)
    proc = subprocess.run(
        [sys.executable, "-m", "pneumonia.fit", "--resume", str(run_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {run_dir} is being written by another process (pid {holder.pid}): wait for "
        f"it to end (or stop it), then continue with python -m pneumonia.fit --resume "
        f"{run_dir} if it did not"
    ]
    assert snapshot(run_dir) == before


def test_a_new_run_in_a_run_dir_another_process_writes_is_refused(tmp_path, holder, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "config.yaml").unlink()  # the other run has only just begun
    before = snapshot(run_dir)
    with pytest.raises(SystemExit) as stopped:
        fit.main([*SMALL, "--run_dir", str(run_dir), "--trainer.max_epochs", "1"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {run_dir} is being written by another process (pid {holder.pid}): choose a "
        f"new --run_dir"
    )
    assert snapshot(run_dir) == before


def test_the_lock_goes_with_its_process(run_dir, holder):
    holder.kill()  # no handler runs: the kernel releases the lock
    holder.wait(timeout=30)
    with locked(run_dir, "unused"):
        pass
