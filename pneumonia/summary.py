"""The end of a run: metrics of its best checkpoint on validation (and test), for summary.json
and TensorBoard's best/* tags. Centralized and federated runs end here alike."""

from __future__ import annotations

from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from pneumonia.data.sources import Splits
from pneumonia.evaluation import evaluate_imageset
from pneumonia.metrics import SCALARS
from pneumonia.module import ClassifierModule
from pneumonia.safeload import safe_load


def best_checkpoint_metrics(
    module: ClassifierModule,
    checkpoint: str | Path,
    splits: Splits,
    tensorboard: SummaryWriter,
    batch_size: int,
) -> tuple[dict, dict]:
    """Load `checkpoint` into `module`; return (its checkpoint dict, {"val": ..., "test": ...})
    and log every scalar and figure under best/<split>/."""
    best = safe_load(checkpoint)
    module.load_state_dict(best["state_dict"])
    results = {}
    for name in ("val", "test"):
        imageset = getattr(splits, name)
        if imageset is None:
            continue
        values, metrics = evaluate_imageset(module, imageset, batch_size)
        results[name] = values
        for key, value in values.items():
            if isinstance(value, float):
                tensorboard.add_scalar(f"best/{name}/{key}", value, 0)
        for fig_name, figure in metrics.figures(module.negative_and_positive).items():
            tensorboard.add_figure(f"best/{name}/{fig_name}", figure, 0)
    tensorboard.flush()
    return best, results


def format_metrics(values: dict) -> str:
    """One line of the scalar metrics."""
    return "  ".join(f"{k} {values[k]:.3f}" for k in SCALARS) + f"  (n={values['n']})"


def print_summary(summary: dict, best_key: str, summary_path: Path) -> None:
    for name in ("val", "test"):
        if name in summary:
            label = best_key.replace("_", " ")
            print(f"{name} ({label} {summary[best_key]}): {format_metrics(summary[name])}")
    print(f"summary: {summary_path}")
