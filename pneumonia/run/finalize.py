"""The end of every run, centralized or federated alike: score the reported model (best.ckpt)
on validation (and test), choose its decision threshold and write it into the checkpoint,
write every image's probability, and log best/* to TensorBoard; then print the summary."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lightning.pytorch.loggers import TensorBoardLogger

from pneumonia.checkpoint import module_from, read_checkpoint, set_threshold
from pneumonia.data.sources import Splits
from pneumonia.files import write_csv
from pneumonia.metrics import SCALARS, youden_threshold
from pneumonia.module import ClassifierModule
from pneumonia.scoring import (
    evaluate_imageset,
    predict_probabilities,
    score,
    score_with_intervals,
)


@dataclass
class Trained:
    """What `train_centralized` and `train_federated` both return."""

    unit: str  # "epoch" or "round": what best.ckpt's step counts
    checkpoint: Path  # the reported model
    selected_by: str  # how it was chosen, in words
    logger: TensorBoardLogger  # the run's own events file
    details: dict = field(default_factory=dict)  # summary keys of this kind of run
    hparams_metrics: dict = field(default_factory=dict)  # for TensorBoard's HPARAMS tab


def choose_threshold(module: ClassifierModule, splits: Splits, rule: float | str, bs: int) -> float:
    """The decision threshold: a fixed number, or "youden" chosen on the validation images."""
    if rule != "youden":
        return float(rule)
    probs = predict_probabilities(module, splits.val.images, bs)
    return youden_threshold(probs, splits.val.labels == module.positive)


def finalize(
    trained: Trained,
    splits: Splits,
    batch_size: int,
    threshold: float | str,
    run_dir: Path,
    config: dict,
) -> dict:
    """Score best.ckpt and choose its threshold (written back into the checkpoint, so
    everything that loads it decides alike); the summary's training part: the kind's details,
    best_<unit>, selected_by, threshold, val, val_shift, test, ("val_at_0.5" when the threshold
    moved). Writes predictions.csv: every image's P(positive), for ROC curves and error
    analysis without re-running the model."""
    recipe, state, ckpt = read_checkpoint(trained.checkpoint)
    module = module_from(recipe, state, trained.checkpoint)
    chosen = choose_threshold(module, splits, threshold, batch_size)
    results: dict = {"threshold": round(chosen, 6), "threshold_rule": str(threshold)}
    if chosen != recipe.threshold:
        results["val_at_0.5"], _ = evaluate_imageset(module, splits.val, batch_size)
        set_threshold(trained.checkpoint, ckpt, chosen)
        module = module_from(recipe.with_threshold(chosen), state, trained.checkpoint)
    tensorboard = trained.logger.experiment
    rows = []
    for name, imageset in splits.evaluation_sets().items():
        probs = predict_probabilities(module, imageset.images, batch_size)
        values, metrics = score_with_intervals(module, probs, imageset)
        results[name] = values
        rows += prediction_rows(name, imageset, probs, module.positive)
        if name == "val_shift":
            results["val_shift_by_kind"] = by_shift_kind(module, imageset, probs)
        for key, value in values.items():
            if isinstance(value, float):
                tensorboard.add_scalar(f"best/{name}/{key}", value, 0)
        for fig_name, figure in metrics.figures(module.negative_and_positive).items():
            tensorboard.add_figure(f"best/{name}/{fig_name}", figure, 0)
    tensorboard.flush()
    write_csv(run_dir / "predictions.csv", rows)
    if trained.hparams_metrics:
        trained.logger.log_hyperparams(config, trained.hparams_metrics)
    best = {f"best_{trained.unit}": int(ckpt[trained.unit]), "selected_by": trained.selected_by}
    return trained.details | best | results


def by_shift_kind(module: ClassifierModule, imageset, probs) -> dict[str, dict]:
    """Accuracy, recall, specificity and AUROC of the shifted images of each kind (each kind
    holds about an eighth of the validation images, so these are rough)."""
    kinds = [name.rsplit("#", 1)[-1] for name in imageset.names]
    out = {}
    for kind in dict.fromkeys(kinds):
        index = [i for i, k in enumerate(kinds) if k == kind]
        values, _ = score(module, probs[index], imageset.labels[index])
        out[kind] = {k: round(values[k], 4) for k in ("accuracy", "recall", "specificity", "auroc")}
        out[kind]["n"] = len(index)
    return out


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


# Short names for the one-line summary, so a line with intervals fits a terminal.
SHORT = {"accuracy": "acc", "precision": "prec", "specificity": "spec"}


def format_metrics(values: dict) -> str:
    """One line of the scalar metrics, each with its 95% interval when there is one."""
    intervals = values.get("ci95", {})

    def one(key: str) -> str:
        low_high = intervals.get(key)
        ci = f" [{low_high[0]:.3f}, {low_high[1]:.3f}]" if low_high else ""
        return f"{SHORT.get(key, key)} {values[key]:.3f}{ci}"

    return "  ".join(one(k) for k in SCALARS) + f"  (n={values['n']})"


def print_summary(summary: dict, best_key: str, summary_path: Path) -> None:
    """The model's metrics with 95% intervals (by patient), and how model and threshold were
    chosen."""
    label = best_key.replace("_", " ")
    print(f"model: {summary['selected_by']} ({label} {summary[best_key]})")
    if "val_at_0.5" in summary:
        print(f"val at threshold 0.5: {format_metrics(summary['val_at_0.5'])}")
        rule = summary["threshold_rule"]
        print(
            f"threshold {summary['threshold']:.3f} ({rule}, chosen on the clean validation "
            f"images: the val line below is optimistic; val_shift shows what it does elsewhere)"
        )
    for name in ("val", "val_shift", "test"):
        if name in summary:
            print(f"{name:9s} {format_metrics(summary[name])}")
    print(f"summary: {summary_path}  (intervals: 95% bootstrap over patients)")
