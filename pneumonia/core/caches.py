"""Where the package keeps what it can recompute, and the cache of rendered `--help` texts.

A command's help is built from its parser, and the fit parser takes Lightning's Trainer
arguments, so rendering it imports Lightning, torchmetrics and torchvision: about 4 s before the
first line. The text is a pure function of the package's sources, the installed versions of
what renders it, the config files it reads and the terminal's width, so it is kept under a key
made of exactly those, and a second `--help` prints it at once. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path

PACKAGE = Path(__file__).parents[1]
# Whose versions change the help: the parser, and the Trainer whose arguments it lists.
RENDERERS = ("jsonargparse", "lightning", "docstring-parser")


def default_cache_dir() -> Path:
    """$PNEUMONIA_CACHE, else $XDG_CACHE_HOME/pneumonia, else ~/.cache/pneumonia."""
    if os.environ.get("PNEUMONIA_CACHE"):
        return Path(os.environ["PNEUMONIA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pneumonia"


def cached_help(
    command: str, inputs: Iterable[Path], argv: list[str], render: Callable[[], str]
) -> str:
    """`render()`'s text, from the cache when the same sources, versions, `inputs` (config files
    the help reads), `argv`, working directory and terminal width rendered it before. An input
    that cannot be read renders afresh, so its error comes from the usual checks; a cache that
    cannot be written is no error (a read-only home still gets its help)."""
    try:
        key = _key(command, inputs, argv)
    except OSError:
        return render()
    path = default_cache_dir() / "help" / f"{key}.txt"
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        pass
    text = render()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(text)
        partial.replace(path)  # whole or absent: two commands at once both write a full text
    except OSError:
        pass
    return text


def _key(command: str, inputs: Iterable[Path], argv: list[str]) -> str:
    digest = hashlib.sha256()
    for part in (command, sys.version, os.getcwd(), str(_width()), *argv, *_versions()):
        digest.update(part.encode() + b"\0")
    for path in sorted(PACKAGE.rglob("*")):
        if path.suffix in (".py", ".yaml") and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(PACKAGE)).encode() + b"\0" + path.read_bytes())
    for path in inputs:
        digest.update(str(path).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:32]


def _width() -> int:
    """The width argparse wraps to (it reads $COLUMNS, then the terminal)."""
    return shutil.get_terminal_size().columns


def _versions() -> list[str]:
    found = []
    for name in RENDERERS:
        try:
            found.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} absent")
    return found
