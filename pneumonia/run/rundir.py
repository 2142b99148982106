"""The run directory: everything one training run leaves behind.

runs/<experiment>/version_N/
  config.yaml             every option, defaults filled in (`--resume` reads it back)
  split.csv               every image's split, class and patient: the split can be checked
  events.out.tfevents.*   TensorBoard: curves, figures, and best/* of the reported model
  checkpoints/best.ckpt   the reported model, with its threshold (pneumonia.checkpoint)
  checkpoints/last.ckpt   the latest epoch's or round's model
  predictions.csv         P(positive) of best.ckpt for every validation (and test) image
  summary.json            metrics of best.ckpt with 95% intervals, and how it was chosen
centralized runs add
  metrics.csv, hparams.yaml   Lightning's CSV logger: every logged scalar by step and epoch
federated runs add
  partition.csv           each client's images, patients and classes
  rounds.csv              one row per round: each client's n and loss, global metrics, times
  checkpoints/federated_state.pt   what `--resume` continues from (pneumonia.federated.state)
  clients/client_J/       each client's own TensorBoard curves
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.loggers import CSVLogger

from pneumonia.data.imageset import ImageSet
from pneumonia.errors import UserError
from pneumonia.files import write_csv


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
    while True:  # another run may take the same number between listing and creating
        # Lightning's loggers number their versions this way; ours must agree with them.
        version = CSVLogger(runs_root, name=experiment).version
        path = Path(runs_root) / experiment / f"version_{version}"
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue


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
