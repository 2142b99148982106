"""Writing files so that a crash or a kill never leaves half of one: every writer goes through
a temporary file in the same folder and an atomic rename."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable
from pathlib import Path

from pneumonia.core.errors import UserError, first_line


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so readers never see half a file. A file name
    that is not valid UTF-8 (its bytes kept as surrogates) is written as \\udcXX escapes, so the
    file stays UTF-8 for every reader."""
    write_bytes_atomic(path, text.encode("utf-8", "backslashreplace"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """`write_text_atomic` for bytes."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as err:  # a failed write() names no file, a failed open() the hidden one
        raise OSError(err.errno, err.strerror or first_line(err, 100), str(path)) from err
    finally:
        tmp.unlink(missing_ok=True)


def check_writable_folder(key: str, folder: str | Path) -> None:
    """A one-line error now, rather than a failed write later, when `folder` (the value of
    config key `key`) is a file, or cannot be created or written to."""
    path = Path(folder)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UserError(f"{key} {path}: {existing} is a file, not a folder: choose another path")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(
            f"{key} {path}: {existing} is not writable: choose a folder you may write to"
        )


def check_not_input(key: str, output: str | Path, inputs: Iterable[str | Path]) -> None:
    """Refuse to write `output` (the value of option `key`) when it is one of the files the
    command reads, under any name (a symlink, a hard link, another spelling of the path):
    writing it would destroy what is being read."""
    target = _identity(output)
    if target is None:  # a file that does not exist yet is no input
        return
    for source in inputs:
        if _identity(source) == target:
            raise UserError(
                f"{key} {output} would overwrite {source}, which this command reads: choose "
                f"another path for {key}"
            )


def check_not_input_folder(key: str, folder: str | Path, inputs: Iterable[str | Path]) -> None:
    """Refuse a folder of outputs named after their inputs when it is an input folder or holds
    an input file: an output could replace an input."""
    target = _identity(folder)
    if target is None:
        return
    folders: dict[str, str] = {}  # one stat per folder, however many files it holds
    for source in map(str, inputs):
        path = os.path.abspath(source)
        is_folder = os.path.isdir(path)
        where = f"is the input folder {source}" if is_folder else f"holds the input {source}"
        folders.setdefault(path if is_folder else os.path.dirname(path), where)
    for path, where in folders.items():
        if _identity(path) == target:
            raise UserError(
                f"{key} {folder} {where}: what is written there could replace an input; "
                f"choose a folder outside the inputs' folders for {key}"
            )


def _identity(path: str | Path) -> tuple[int, int] | None:
    """(device, inode) of what `path` names after following links, or None if nothing."""
    try:
        stat = os.stat(path)
    except (OSError, ValueError):
        return None
    return stat.st_dev, stat.st_ino


def save_atomic(obj: object, path: Path) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves half a file."""
    import torch  # here, not at the top: commands' --help import this module

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except RuntimeError as err:  # torch's writer reports a full disk as "file write failed"
        raise OSError(None, f"could not be written ({first_line(err, 100)})", str(path)) from err
    except OSError as err:  # named by the file the user knows, not the hidden temporary one
        raise OSError(err.errno, err.strerror or first_line(err, 100), str(path)) from err
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj: object) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_csv(path: Path, rows: list[dict]) -> None:
    """Rows of dicts as CSV (columns: the last row's keys; missing cells empty), atomically.
    The csv module quotes any cell holding a comma, such as a file name."""
    if not rows:
        return
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[-1]), restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, out.getvalue())
