"""reports/<name>/: the results table (CSV and Markdown) and figures, drawn from the entries'
run directories alone (summary.json, metrics.csv or rounds.csv, predictions.csv), so a report
can be re-drawn at any time without training or data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from pneumonia.compare import plots
from pneumonia.compare.plan import Comparison, Entry, option
from pneumonia.metrics import SCALARS
from pneumonia.rundir import write_csv, write_text_atomic

SHORT = {
    "accuracy": "ACC",
    "precision": "P",
    "recall": "R",
    "f1": "F1",
    "specificity": "Spec",
    "auroc": "AUROC",
}


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
    }
    for split in ("val", "test"):
        for key in SCALARS:
            row[f"{split}_{key}"] = summary[split][key] if split in summary else ""
    row |= {
        "parameters": summary["parameters"],
        "wall_time_s": summary["wall_time_s"],
        # Centralized training pools every hospital's images in one place; FedAvg moves weights.
        "data_left_site": "no" if entry.federated else "yes",
        "config_hash": entry.key,
        "run_dir": str(entry.run_dir),
    }
    return row


def markdown_table(rows: list[dict], split: str) -> str:
    """The results as a Markdown table for one split."""
    header = ["Entry", "Training", "Data left site", *SHORT.values(), "Params", "Wall time"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["label"], row["training"], row["data_left_site"]]
        cells += [f"{row[f'{split}_{key}']:.3f}" for key in SHORT]
        cells += [f"{row['parameters'] / 1e6:.1f} M", duration(row["wall_time_s"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


def results_markdown(comparison: Comparison, rows: list[dict]) -> str:
    parts = [f"# {comparison.name}", comparison.description.strip()]
    for split, title in (("val", "Validation split"), ("test", "Test split")):
        if rows and rows[0][f"{split}_accuracy"] != "":
            parts += [f"## {title}", markdown_table(rows, split)]
    thresholds = sorted({str(r["threshold"]) for r in rows})
    parts.append(
        "Metrics of each entry's best epoch or round, chosen on the validation split by "
        f"{comparison.entries[0].cfg.monitor}; decision threshold {', '.join(thresholds)}. "
        "Budget: passes over the training images (federated: rounds x local epochs x C)."
    )
    return "\n\n".join(p for p in parts if p) + "\n"


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
    aurocs = {r["label"]: {s: r[f"{s}_auroc"] for s in ("val", "test")} for r in rows}
    plots.roc({e.label: predictions(e) for e in entries}, aurocs, out / "roc.png")
    for entry, row, summary in zip(entries, rows, summaries, strict=True):
        matrices = {s: summary[s]["confusion_matrix"] for s in ("val", "test") if s in summary}
        classes = entry.cfg.positive_class
        plots.confusion(
            matrices, entry.label, row["threshold"], classes, out / f"confusion_{entry.name}.png"
        )
    if comparison.sweep:
        sweep_figure(comparison, rows)
    return out / "results.md"


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
