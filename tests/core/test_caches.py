"""The help cache: a second `--help` prints without rendering, and anything the text depends on
(a source file, a config it reads, the command line) renders it afresh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pneumonia.core import caches

ROOT = Path(__file__).parents[2]


@pytest.fixture
def package(tmp_path, monkeypatch) -> Path:
    """A stand-in package whose sources the key reads."""
    source = tmp_path / "pkg"
    source.mkdir()
    (source / "a.py").write_text("X = 1\n")
    monkeypatch.setattr(caches, "PACKAGE", source)
    return source


class Renders:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> str:
        self.count += 1
        return f"help {self.count}\n"


def test_the_second_call_reads_the_cache(package, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("a: 1\n")
    render = Renders()
    first = caches.cached_help("fit", [config], ["--help"], render)
    assert caches.cached_help("fit", [config], ["--help"], render) == first == "help 1\n"
    assert render.count == 1


@pytest.mark.parametrize("change", ["source", "config", "argv", "command"])
def test_what_the_text_depends_on_renders_it_again(package, tmp_path, change):
    config = tmp_path / "c.yaml"
    config.write_text("a: 1\n")
    render = Renders()
    caches.cached_help("fit", [config], ["--help"], render)
    argv, command = ["--help"], "fit"
    if change == "source":
        (package / "a.py").write_text("X = 2\n")
    elif change == "config":
        config.write_text("a: 2\n")
    elif change == "argv":
        argv = ["--config", str(config), "--help"]
    else:
        command = "evaluate"
    assert caches.cached_help(command, [config], argv, render) == "help 2\n"


def test_a_missing_input_renders_without_caching(package, tmp_path):
    render = Renders()
    for _ in range(2):
        caches.cached_help("fit", [tmp_path / "absent.yaml"], ["--help"], render)
    assert render.count == 2
    assert not (caches.default_cache_dir() / "help").exists()


def test_a_cache_that_cannot_be_written_still_answers(package, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("PNEUMONIA_CACHE", str(blocker))  # a file where the folder would go
    assert caches.cached_help("fit", [], ["--help"], Renders()) == "help 1\n"


def test_fit_help_from_the_cache_imports_no_torch(tmp_path):
    """The point of the cache: the second `fit --help` starts without torch or Lightning, and
    prints the same text as the first."""
    probe = (
        "import json, sys, contextlib, io\n"
        "from pneumonia import fit\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
        "    fit.main(['--help'])\n"
        "heavy = [m for m in ('torch', 'lightning') if m in sys.modules]\n"
        "print(json.dumps([out.getvalue(), heavy]))\n"
    )
    env = {**os.environ, "PNEUMONIA_CACHE": str(tmp_path), "COLUMNS": "100"}
    runs = [
        json.loads(
            subprocess.run(
                [sys.executable, "-c", probe],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        for _ in range(2)
    ]
    assert runs[0][1] == ["torch", "lightning"]  # rendered: the parser needs the Trainer
    assert runs[1] == [runs[0][0], []]
    assert "--federated.strategy" in runs[1][0]
