"""The end of a run: metrics of its best checkpoint on validation (and test), for summary.json
and TensorBoard's best/* tags. Centralized and federated runs end here alike."""

from __future__ import annotations

from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from pneumonia.data.sources import Splits
from pneumonia.evaluation import evaluate_imageset, predict_probabilities, score
from pneumonia.metrics import SCALARS, youden_threshold
from pneumonia.module import ClassifierModule
from pneumonia.rundir import save_atomic, write_csv
from pneumonia.safeload import safe_load


def choose_threshold(module: ClassifierModule, splits: Splits, rule: float | str, bs: int) -> float:
    """The decision threshold: a fixed number, or "youden" chosen on the validation images."""
    if rule != "youden":
        return float(rule)
    probs = predict_probabilities(module, splits.val.images, bs)
    return youden_threshold(probs, splits.val.labels == module.positive)


def best_checkpoint_metrics(
    module: ClassifierModule,
    checkpoint: str | Path,
    splits: Splits,
    tensorboard: SummaryWriter,
    batch_size: int,
    threshold: float | str = 0.5,
    predictions_csv: Path | None = None,
) -> tuple[dict, dict]:
    """Load `checkpoint` into `module`; choose the decision threshold (written back into the
    checkpoint, so `pneumonia.evaluate` uses it); return (the checkpoint dict, {"threshold",
    "val", "test", and "val_at_0.5" when the threshold moved}); log best/<split>/* to
    TensorBoard; with `predictions_csv`, write every image's P(positive) there (ROC curves and
    error analysis need no re-run of the model)."""
    best = safe_load(checkpoint)
    module.load_state_dict(best["state_dict"])
    chosen = choose_threshold(module, splits, threshold, batch_size)
    results: dict = {"threshold": round(chosen, 6), "threshold_rule": str(threshold)}
    if chosen != module.hparams.threshold:
        results["val_at_0.5"], _ = evaluate_imageset(module, splits.val, batch_size)
        module.hparams.threshold = chosen
        best["hyper_parameters"]["threshold"] = chosen
        save_atomic(best, Path(checkpoint))
    rows = []
    for name in ("val", "test"):
        imageset = getattr(splits, name)
        if imageset is None:
            continue
        probs = predict_probabilities(module, imageset.images, batch_size)
        values, metrics = score(module, probs, imageset.labels)
        results[name] = values
        rows += prediction_rows(name, imageset, probs, module.positive)
        for key, value in values.items():
            if isinstance(value, float):
                tensorboard.add_scalar(f"best/{name}/{key}", value, 0)
        for fig_name, figure in metrics.figures(module.negative_and_positive).items():
            tensorboard.add_figure(f"best/{name}/{fig_name}", figure, 0)
    tensorboard.flush()
    if predictions_csv is not None:
        write_csv(predictions_csv, rows)
    return best, results


def prediction_rows(split: str, imageset, probs, positive: int) -> list[dict]:
    """One row per image: its split, name, patient, whether it is positive, P(positive)."""
    return [
        {
            "split": split,
            "image": name,
            "patient": patient,
            "positive": int(label == positive),
            "probability": p,  # unrounded: rounding makes ties that move AUROC
        }
        for name, patient, label, p in zip(
            imageset.names,
            imageset.patients,
            imageset.labels.tolist(),
            probs.tolist(),
            strict=True,
        )
    ]


def format_metrics(values: dict) -> str:
    """One line of the scalar metrics."""
    return "  ".join(f"{k} {values[k]:.3f}" for k in SCALARS) + f"  (n={values['n']})"


def print_summary(summary: dict, best_key: str, summary_path: Path) -> None:
    if "val_at_0.5" in summary:
        print(f"val at threshold 0.5: {format_metrics(summary['val_at_0.5'])}")
        rule = summary["threshold_rule"]
        print(f"threshold {summary['threshold']:.3f} ({rule}, chosen on the validation images)")
    for name in ("val", "test"):
        if name in summary:
            label = best_key.replace("_", " ")
            print(f"{name} ({label} {summary[best_key]}): {format_metrics(summary[name])}")
    print(f"summary: {summary_path}")
