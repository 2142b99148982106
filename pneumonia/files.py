"""Writing files so that a crash or a kill never leaves half of one: every writer goes through
a temporary file in the same folder and an atomic rename."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import torch

from pneumonia.errors import UserError, first_line


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so readers never see half a file."""
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """`write_text_atomic` for bytes."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
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


def save_atomic(obj: object, path: Path) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except RuntimeError as err:  # torch's writer reports a full disk as "file write failed"
        raise OSError(None, f"could not be written ({first_line(err, 100)})", str(path)) from err
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
