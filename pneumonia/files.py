"""Writing files so that a crash or a kill never leaves half of one: every writer goes through
a temporary file in the same folder and an atomic rename."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import torch


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_atomic(obj: object, path: Path) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
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
