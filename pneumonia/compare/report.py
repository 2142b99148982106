"""reports/<name>/: the results table (CSV and Markdown) and figures, drawn from the entries'
run directories alone (summary.json, metrics.csv or rounds.csv, predictions.csv), so a report
can be re-drawn at any time without training or data."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from pneumonia.compare import plots
from pneumonia.compare.plan import Comparison, Entry, option
from pneumonia.files import write_bytes_atomic, write_csv, write_text_atomic
from pneumonia.metrics import SCALARS
from pneumonia.run.progress import duration

SHORT = {
    "accuracy": "ACC",
    "precision": "P",
    "recall": "R",
    "f1": "F1",
    "specificity": "Spec",
    "auroc": "AUROC",
    "ece": "ECE",
}
# Evaluation sets of summary.json, in the order the report shows them.
SPLITS = {"val": "Validation split (clean)", "val_shift": "Shift validation", "test": "Test split"}


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_summary(entry: Entry) -> dict:
    return json.loads((entry.run_dir / "summary.json").read_text())


def entry_row(entry: Entry, summary: dict) -> dict:
    """One row of results.csv: what the entry is, its best checkpoint's metrics, its cost."""
    cfg, fed = entry.cfg, entry.cfg.federated
    row = {
        "entry": entry.name,
        "label": entry.label,
        "training": "federated" if entry.federated else "centralized",
        "model": cfg.model.name,
        "norm": cfg.model.norm,
        "image_size": cfg.data.image_size,
        "batch_size": cfg.data.batch_size,
        "strategy": fed.strategy if entry.federated else "",
        "partition": f"{fed.partition}x{fed.clients}" if entry.federated else "",
        "budget_passes": round(entry.budget, 3),
        # Counted from 1 for both kinds (summary.json's best_epoch is Lightning's, from 0).
        "best_epoch_or_round": summary.get("best_round", summary.get("best_epoch", -1) + 1),
        "threshold": summary["threshold"],
        "selected_by": summary.get("selected_by", ""),
    } | privacy_columns(summary)
    for split in SPLITS:
        row |= split_columns(summary.get(split), split)
    row |= {
        "parameters": summary["parameters"],
        "wall_time_s": summary["wall_time_s"],
        # Centralized training pools every hospital's images in one place; FedAvg moves weights.
        "data_left_site": "no" if entry.federated else "yes",
        "config_hash": entry.key,
        "run_dir": str(entry.run_dir),
    }
    return row


def privacy_columns(summary: dict) -> dict:
    """The run's weakest (largest) epsilon and its delta; empty cells without DP."""
    guarantees = list(summary.get("privacy", {}).values())
    if not guarantees:
        return {"epsilon": "", "delta": ""}
    weakest = max(guarantees, key=lambda g: g["epsilon"])
    return {"epsilon": weakest["epsilon"], "delta": weakest["delta"]}


def split_columns(values: dict | None, split: str) -> dict:
    """`{split}_{key}` and its 95% interval `{split}_{key}_low`, `_high` for every scalar;
    empty cells for a split the run lacks (no test folder) or an interval it lacks (older
    runs wrote no ci95)."""
    values = values or {}
    intervals = values.get("ci95", {})
    out = {}
    for key in SCALARS:
        low, high = intervals.get(key, ("", ""))
        out |= {f"{split}_{key}": values.get(key, "")}
        out |= {f"{split}_{key}_low": low, f"{split}_{key}_high": high}
    return out


def metric_cell(row: dict, name: str) -> str:
    """`0.952 (0.931-0.968)`: the value and its 95% interval, or the value alone when there
    is no interval (a bootstrap with no positive patient drawn gives NaN)."""
    value, low, high = row[name], row[f"{name}_low"], row[f"{name}_high"]
    if value == "":
        return "-"
    if low == "" or high == "" or math.isnan(low) or math.isnan(high):
        return f"{value:.3f}"
    return f"{value:.3f} ({low:.3f}-{high:.3f})"


def markdown_table(rows: list[dict], split: str) -> str:
    """The results as a Markdown table for one split."""
    private = any(r["epsilon"] != "" for r in rows)
    header = ["Entry", "Training", "Data left site"] + (["Epsilon (delta)"] if private else [])
    header += [*SHORT.values(), "Params", "Wall time"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["label"], row["training"], row["data_left_site"]]
        if private:
            no_dp = row["epsilon"] == ""
            cells.append("no DP" if no_dp else f"{row['epsilon']:.2f} ({row['delta']:g})")
        cells += [metric_cell(row, f"{split}_{key}") for key in SHORT]
        cells += [f"{row['parameters'] / 1e6:.1f} M", duration(row["wall_time_s"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_markdown(comparison: Comparison, rows: list[dict]) -> str:
    parts = [f"# {comparison.name}", comparison.description.strip()]
    for split, title in SPLITS.items():
        if any(r[f"{split}_accuracy"] != "" for r in rows):
            parts += [f"## {title}", markdown_table(rows, split)]
    thresholds = sorted({str(r["threshold"]) for r in rows})
    parts.append(
        "Intervals are 95% bootstrap intervals resampled by patient. The validation split is "
        "cut from the training pool (same hospitals, same acquisition), so it overstates "
        f"accuracy on new patients; shift validation is a harder check. {selection(rows)}; "
        f"decision threshold {', '.join(thresholds)}. "
        "Budget: passes over the training images (federated: rounds x local epochs x C). "
        "cases_<entry>.png: each entry's most confident correct and wrong validation "
        "decisions with their Grad-CAM heatmaps."
    )
    if any(r["epsilon"] != "" for r in rows):
        parts.append(
            "Epsilon (delta): the weakest differential-privacy guarantee of the entry, the "
            "largest epsilon any client's own accountant reached by the end of training "
            "(DP-SGD protects one training image of one hospital); privacy.png plots accuracy "
            "and AUROC against it."
        )
    return "\n\n".join(p for p in parts if p) + "\n"


def selection(rows: list[dict]) -> str:
    """Which rule chose the reported models: one sentence when every entry used the same."""
    rules = {r["selected_by"] for r in rows}
    if len(rules) == 1 and "" not in rules:
        return f"Each entry's reported model is {rules.pop()}"
    return "The rule that chose each entry's model is in results.csv (selected_by)"


def curve(entry: Entry) -> dict[str, list[tuple[float, float]]]:
    """{"train_loss", "val_loss", "val_accuracy"}: (passes over the training images, value).
    A federated round counts E x C passes, so both kinds of entry share one x axis."""
    series: dict[str, list[tuple[float, float]]] = {
        "train_loss": [],
        "val_loss": [],
        "val_accuracy": [],
    }
    if entry.federated:
        for row in read_csv(entry.run_dir / "rounds.csv"):
            x = int(row["round"]) * entry.passes
            for key in series:
                series[key].append((x, float(row[key])))
        return series
    columns = {
        "train_loss": "train/loss_epoch",
        "val_loss": "val/loss",
        "val_accuracy": "val/accuracy",
    }
    for row in read_csv(entry.run_dir / "metrics.csv"):
        for key, column in columns.items():
            if row.get(column):
                series[key].append((int(row["epoch"]) + 1, float(row[column])))
    return series


def predictions(entry: Entry) -> list[dict]:
    path = entry.run_dir / "predictions.csv"
    return read_csv(path) if path.is_file() else []


def write_report(comparison: Comparison) -> Path:
    """Every file of reports/<name>/; returns results.md's path."""
    out = comparison.report_dir
    out.mkdir(parents=True, exist_ok=True)
    entries = comparison.entries
    summaries = [read_summary(e) for e in entries]
    rows = [entry_row(e, summary) for e, summary in zip(entries, summaries, strict=True)]
    write_csv(out / "results.csv", rows)
    markdown = results_markdown(comparison, rows)
    write_text_atomic(out / "results.md", markdown)
    curves = {e.label: curve(e) for e in entries}
    plots.curves(curves, ["val_accuracy"], "accuracy", out / "curves_accuracy.png")
    plots.curves(curves, ["train_loss", "val_loss"], "loss", out / "curves_loss.png")
    aurocs = {r["label"]: {s: r[f"{s}_auroc"] for s in SPLITS} for r in rows}
    scored = {e.label: predictions(e) for e in entries}  # read once: ROC and reliability
    plots.roc(scored, aurocs, out / "roc.png")
    for entry, row, summary in zip(entries, rows, summaries, strict=True):
        matrices = {s: summary[s]["confusion_matrix"] for s in SPLITS if s in summary}
        classes = entry.cfg.positive_class
        plots.confusion(
            matrices, entry.label, row["threshold"], classes, out / f"confusion_{entry.name}.png"
        )
        plots.reliability(
            scored[entry.label], entry.label, classes, out / f"reliability_{entry.name}.png"
        )
        copy_cases_panel(entry, out / f"cases_{entry.name}.png")
    if comparison.sweep:
        sweep_figure(comparison, rows)
    if any(r["epsilon"] != "" for r in rows):
        plots.privacy(rows, out / "privacy.png")
    return out / "results.md"


def copy_cases_panel(entry: Entry, target: Path) -> None:
    """The entry's Grad-CAM panel of its most confident correct and wrong validation decisions
    (drawn by the run: `pneumonia.run.finalize`), beside the entry's other figures."""
    source = entry.run_dir / "cases.png"
    if source.is_file():  # runs from before heatmaps have none
        write_bytes_atomic(target, source.read_bytes())


def sweep_figure(comparison: Comparison, rows: list[dict]) -> None:
    sweep = comparison.sweep
    split = "test" if rows[0]["test_accuracy"] != "" else "val"
    points = [
        (
            option(e.cfg, sweep["x"]),
            str(option(e.cfg, sweep["line"])),
            row[f"{split}_{sweep['metric']}"],
        )
        for e, row in zip(comparison.entries, rows, strict=True)
    ]
    plots.sweep(
        points,
        sweep["x"],
        sweep["line"],
        f"{split} {sweep['metric']}",
        comparison.report_dir / sweep["file"],
    )
