"""What a finished run says on the console: the reported model's metrics with 95% intervals
(by patient), how model and threshold were chosen, the groups an average hides, the
cross-site matrix and what transfer learning froze. The lines are built here (`summary_lines`)
and logged (`log_summary`): pneumonia.core.startup's console prints them."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from pneumonia.metrics.classification import SCALARS

log = logging.getLogger(__name__)

# Short names for the one-line summary, so a line with intervals fits a terminal.
SHORT = {"accuracy": "acc", "precision": "prec", "specificity": "spec"}
FIGURE_SETS = ("val", "val_shift", "test", "held_out")


def log_summary(summary: dict, best_key: str, summary_path: Path) -> None:
    """Log the summary's lines; `best_key`: best_epoch or best_round."""
    for line in summary_lines(summary, best_key, summary_path):
        log.info(line)


def summary_lines(summary: dict, best_key: str, summary_path: Path) -> Iterator[str]:
    yield from choice_lines(summary, best_key)
    yield from figure_lines(summary)
    yield from group_lines(summary)
    yield from cross_site_lines(summary)
    yield from transfer_lines(summary)
    yield f"summary: {summary_path}  (intervals: 95% bootstrap over patients)"


def choice_lines(summary: dict, best_key: str) -> Iterator[str]:
    """How the model and its threshold were chosen."""
    label = best_key.replace("_", " ")
    yield f"model: {summary['selected_by']} ({label} {summary[best_key]})"
    if "val_at_0.5" in summary:
        yield f"val at threshold 0.5: {format_metrics(summary['val_at_0.5'])}"
        rule = summary["threshold_rule"]
        yield (
            f"threshold {summary['threshold']:.3g} ({rule}, chosen on the clean validation "
            f"images: the val line below is optimistic; val_shift shows what it does elsewhere)"
        )


def figure_lines(summary: dict) -> Iterator[str]:
    """A line per evaluation set (and its three-class figures), then a line per site."""
    for name in FIGURE_SETS:
        if name in summary:
            yield f"{name:9s} {format_metrics(summary[name])}"
            if "classes" in summary[name]:
                yield f"{'':9s} {format_classes(summary[name]['classes'])}"
    for site, values in summary.get("val_by_site", {}).items():
        yield f"  val {site:5s} {format_metrics(values)}"


def group_lines(summary: dict) -> Iterator[str]:
    """Accuracy by file-name family with intervals (a one-class family's accuracy is its
    specificity or recall), and a warning for a group the average hides."""
    for name in ("val", "val_shift"):
        groups = summary.get(f"{name}_by_group", {})
        if groups:
            cells = []
            for family, values in groups.items():
                low, high = values["ci95"]["accuracy"]
                accuracy = f"{values['accuracy']:.3f} [{low:.3f}, {high:.3f}]"
                cells.append(f"{family} {accuracy} (n={values['n']})")
            yield f"  {name} acc by file family: " + "; ".join(cells)
    for name, worst in summary.get("worst_group", {}).items():
        if worst["hidden"]:
            low, high = worst["ci95"]
            yield (
                f"warning: {name} group {worst['group']} has accuracy {worst['accuracy']:.3f} "
                f"[{low:.3f}, {high:.3f}], wholly below the {name} average's interval: the "
                f"average hides it"
            )


def cross_site_lines(summary: dict) -> Iterator[str]:
    if "cross_site" not in summary:
        return
    yield "cross-site accuracy (model on site):"
    for row in summary["cross_site"]:
        yield (
            f"  {row['model']:12s} on {row['data']:8s} {row['accuracy']:.3f} "
            f"[{row['accuracy_low']:.3f}, {row['accuracy_high']:.3f}]  auroc {row['auroc']:.3f}"
        )


def transfer_lines(summary: dict) -> Iterator[str]:
    if "transfer" in summary:
        t = summary["transfer"]
        yield (
            f"transfer {t['mode']}: froze {', '.join(t['frozen']) or 'nothing'} "
            f"({t['frozen_parameters']:,} parameters); {t['trainable_parameters']:,} trained"
        )


def format_metrics(values: dict) -> str:
    """One line of the scalar metrics, each with its 95% interval when there is one."""
    intervals = values.get("ci95", {})

    def one(key: str) -> str:
        low_high = intervals.get(key)
        ci = f" [{low_high[0]:.3f}, {low_high[1]:.3f}]" if low_high else ""
        return f"{SHORT.get(key, key)} {values[key]:.3f}{ci}"

    return "  ".join(one(k) for k in SCALARS) + f"  (n={values['n']})"


def format_classes(values: dict) -> str:
    """One line of three-class figures: accuracy, macro F1, and each class's recall (with
    95% intervals), then the confusion matrix (rows true, columns predicted)."""
    ci = values.get("ci95", {})

    def one(key: str, short: str) -> str:
        low, high = ci.get(key, (float("nan"), float("nan")))
        return f"{short} {values[key]:.3f} [{low:.3f}, {high:.3f}]"

    classes = [k.removeprefix("recall_") for k in values if k.startswith("recall_")]
    parts = [one("class_accuracy", "3-class acc"), one("macro_f1", "macro F1")]
    parts += [one(f"recall_{c}", f"recall {c}") for c in classes]
    return "  ".join(parts) + f"  confusion {values['class_confusion_matrix']}"
