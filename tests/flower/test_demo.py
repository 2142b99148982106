"""`make flower-demo`'s script stops every process it started: on Ctrl-C, and when the run
fails. (Its full run takes minutes; tests/flower/test_federation.py covers a whole federation.)"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pneumonia.flower import demo

DEMO = [sys.executable, "-m", "pneumonia.flower.demo"]


def leftovers(workdir: Path) -> list[str]:
    """Processes whose command line names the demo's folder (SuperLink and SuperNodes do)."""
    found = subprocess.run(["pgrep", "-af", str(workdir)], capture_output=True, text=True)
    return found.stdout.splitlines()


def leftovers_after_exit(workdir: Path, within: float = 10.0) -> list[str]:
    """`leftovers` once they had `within` seconds to go: Flower's superexec watches its
    parent's pid and leaves on its own a moment after it, later on a loaded machine."""
    deadline = time.monotonic() + within
    while (found := leftovers(workdir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


def test_ctrl_c_stops_every_process(tmp_path):
    workdir = tmp_path / "work"
    demo = subprocess.Popen(
        [*DEMO, "--workdir", str(workdir), "--runs_root", str(tmp_path / "runs")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in demo.stdout:
        lines.append(line)
        if "SuperNodes started" in line:
            break
    assert leftovers(workdir), "the SuperLink and SuperNodes should be running now"
    demo.send_signal(signal.SIGINT)
    assert demo.wait(60) == 130
    assert "interrupted" in demo.stdout.read()
    assert leftovers_after_exit(workdir) == []


def test_a_failing_run_ends_in_one_line_and_stops_everything(tmp_path):
    workdir = tmp_path / "work"
    result = subprocess.run(
        [*DEMO, "--workdir", str(workdir), "--nodes", "1", "--model.name", "resnet99"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: unknown model.name 'resnet99'")
    assert str(workdir / "logs") in last
    assert leftovers_after_exit(workdir) == []


def test_demo_arguments_are_checked_before_anything_starts(tmp_path, capsys):
    """In this process (the failing run above covers the real process's exit): nothing
    starts, so no Federation folder appears."""
    workdir = tmp_path / "work"
    for args, message in [
        (["--nodes", "0"], "error: --nodes 0 must be at least 1"),
        (["--config", str(tmp_path / "nope.yaml")], f"error: {tmp_path / 'nope.yaml'} not found"),
    ]:
        with pytest.raises(SystemExit) as stopped:
            demo.main([*args, "--workdir", str(workdir)])
        assert stopped.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(message) and len(err.splitlines()) == 1
    assert not workdir.exists()
