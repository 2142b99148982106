"""`python -m pneumonia.serve` as a user starts it: with --port 0 it prints the port it bound
and answers there, only by its own names and to its own page, and SIGTERM or SIGINT stop it with
143 or 130 (as every entry point) and one line."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def serving(checkpoint: Path, *args: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """(its URL, the process) of `python -m pneumonia.serve --ckpt checkpoint --port 0`, the
    URL read from the line it prints, stopped (if it still runs) when the `with` ends."""
    process = subprocess.Popen(
        [sys.executable, "-m", "pneumonia.serve", "--ckpt", str(checkpoint), "--port", "0"]
        + list(args),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = process.stdout.readline()
        found = re.search(r" on (http://127\.0\.0\.1:(\d+))/ ", line)
        assert found and found.group(2) != "0", f"no port bound in: {line!r}"
        url = found.group(1)
        wait_until_healthy(url, process)
        yield url, process
    finally:
        if process.poll() is None:
            process.terminate()
        process.wait(timeout=30)


def wait_until_healthy(url: str, process: subprocess.Popen, limit: float = 90) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited: {process.stdout.read()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError("the server did not answer /health in time")


def status(url: str, method: str = "GET", **headers: str) -> int:
    request = urllib.request.Request(url, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_the_server_with_its_exit_code(tiny_checkpoint, signum, code):
    with serving(tiny_checkpoint) as (url, process):
        assert status(f"{url}/health", "HEAD") == 200
        assert status(f"{url}/health", Host="evil.example") == 400  # DNS rebinding
        foreign = {"Origin": "http://evil.example", "Content-Type": "multipart/form-data; b=x"}
        assert status(f"{url}/predict", "POST", **foreign) == 403
        process.send_signal(signum)
        assert process.wait(timeout=30) == code
        name = signal.Signals(signum).name
        assert process.stdout.read().splitlines()[-1] == (
            f"interrupted by {name}: the server stopped: it keeps no state to save"
        )
