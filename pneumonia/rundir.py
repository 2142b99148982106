"""The run directory: resolved config, TensorBoard events, metrics.csv, checkpoints, summary.

runs/<experiment>/version_N/
  config.yaml           every option, defaults filled in
  events.out.tfevents*  TensorBoard
  metrics.csv           the same scalars, for pandas
  checkpoints/best.ckpt, last.ckpt
  split.csv             every image's split, class and patient: the split can be checked and reused
  summary.json          final validation (and test) metrics of best.ckpt
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import torch

from pneumonia.data.imageset import ImageSet
from pneumonia.errors import UserError


def new_run_dir(runs_root: str | Path, experiment: str, run_dir: str | None = None) -> Path:
    """Create the next runs_root/experiment/version_N (or `run_dir`, which must be empty)."""
    if run_dir is not None:
        path = Path(run_dir)
        if path.exists() and any(path.iterdir()):
            raise UserError(
                f"run_dir {path} already holds files: choose a new --run_dir or remove it"
            )
        path.mkdir(parents=True, exist_ok=True)
        return path
    parent = Path(runs_root) / experiment
    parent.mkdir(parents=True, exist_ok=True)
    taken = [
        int(p.name.split("_")[1])
        for p in parent.glob("version_*")
        if p.name.split("_")[1].isdigit()
    ]
    version = max(taken, default=-1) + 1
    while True:  # another run may take the same number between listing and creating
        path = parent / f"version_{version}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            version += 1


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


def write_split_table(path: Path, parts: dict[str, ImageSet | None]) -> None:
    """One row per image: split, class, patient, name."""
    rows = [
        {"split": split, "class": images.classes[label], "patient": patient, "name": name}
        for split, images in parts.items()
        if images is not None
        for label, patient, name in zip(
            images.labels.tolist(), images.patients, images.names, strict=True
        )
    ]
    write_csv(path, rows)
