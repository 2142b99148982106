"""reports/<name>/: the results table (CSV and Markdown) and figures, drawn from the entries'
run directories alone (summary.json, metrics.csv or rounds.csv, predictions.csv), so a report
can be re-drawn at any time without training or data. Entries with a family (a study of one
change each from a reference recipe) also get a table and a figure per family."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

from pneumonia.compare import plots
from pneumonia.compare.plan import Comparison, Entry, option
from pneumonia.core.files import write_bytes_atomic, write_csv, write_text_atomic
from pneumonia.metrics.classification import SCALARS
from pneumonia.run.progress import duration
from pneumonia.run.rundir import CASES, CROSS_SITE_TABLE, METRICS, PREDICTIONS, ROUNDS, SUMMARY

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
SPLITS = {
    "val": "Validation split (clean)",
    "val_shift": "Shift validation",
    "test": "Test split",
    "held_out": "Held-out site (leave-one-site-out: every image of a site that trained nowhere)",
}
# The family tables' metric columns: (split, key, heading); MARKED ones carry ▲/▼.
FAMILY_COLUMNS = [
    ("val", "auroc", "Val AUROC"),
    ("val", "accuracy", "Val ACC"),
    ("val", "loss", "Val log loss"),
    ("val_shift", "auroc", "Shift AUROC"),
    ("val_shift", "accuracy", "Shift ACC"),
    ("val_shift", "loss", "Shift log loss"),
]
MARKED = ("auroc", "accuracy")
MARKER_NOTE = (
    "▲ / ▼: the entry's 95% interval (AUROC, ACC) lies entirely above / below the "
    "reference's value; the interval is the entry's own bootstrap over patients, not a paired "
    "test against the reference, so a marker is suggestive and its absence no proof of "
    "equality. Log loss: the unweighted cross-entropy of the split's images."
)
DIVERGED_NOTE = (
    "diverged: the entry's training loss became NaN or infinite (or its validation loss is "
    "not a number), so it has no usable model; it stays in every table."
)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_summary(entry: Entry) -> dict:
    return json.loads((entry.run_dir / SUMMARY).read_text())


def entry_row(entry: Entry, summary: dict) -> dict:
    """One row of results.csv: what the entry is, its best checkpoint's metrics, its cost."""
    cfg, fed = entry.cfg, entry.cfg.federated
    row = {
        "entry": entry.name,
        "label": entry.label,
        "family": entry.family,
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
        # A diverged run may stop before choosing a threshold or timing itself.
        "threshold": summary.get("threshold", ""),
        "selected_by": summary.get("selected_by", ""),
        "diverged": "yes" if diverged(summary) else "no",
    } | privacy_columns(summary)
    for split in SPLITS:
        row |= split_columns(summary.get(split), split)
    row |= site_columns(summary)
    row |= group_columns(summary)
    row |= {
        "parameters": summary.get("parameters", entry.parameters),
        "wall_time_s": summary.get("wall_time_s", math.nan),
        # Centralized training pools every hospital's images in one place; FedAvg moves weights.
        "data_left_site": "no" if entry.federated else "yes",
        "config_hash": entry.key,
        "run_dir": str(entry.run_dir),
    }
    return row


def diverged(summary: dict) -> bool:
    """The run says its training loss became NaN or infinite, or its validation loss is not a
    finite number (JSON's NaN, or null where a writer turned NaN into null)."""
    loss = (summary.get("val") or {}).get("loss", 0.0)
    return summary.get("diverged") is True or loss is None or not math.isfinite(loss)


def is_diverged(row: dict) -> bool:
    return row.get("diverged") == "yes"  # hand-built rows may lack the column


def site_columns(summary: dict) -> dict:
    """A federation's cost and its sites: MB of model state sent, the worst and best site's
    validation accuracy and AUROC (empty for centralized runs)."""
    fed = summary.get("federated") or {}
    sites = summary.get("val_by_site") or {}
    out = {"mb_sent": fed.get("mb_sent", "")}
    for key in ("accuracy", "auroc"):
        values = [v[key] for v in sites.values() if _finite(v.get(key))]
        out[f"worst_site_{key}"] = min(values) if values else ""
        out[f"best_site_{key}"] = max(values) if values else ""
    return out


def group_columns(summary: dict) -> dict:
    """The validation subgroup (file-name family or site) of lowest accuracy, with its 95%
    interval (`worst_group` in summary.json; empty cells where the data has no groups)."""
    worst = (summary.get("worst_group") or {}).get("val") or {}
    low, high = worst.get("ci95") or ("", "")
    return {
        "worst_group": worst.get("group", ""),
        "worst_group_accuracy": worst.get("accuracy", ""),
        "worst_group_accuracy_low": low,
        "worst_group_accuracy_high": high,
    }


def groups_markdown(rows: list[dict]) -> str:
    """Each entry's worst validation subgroup beside its whole validation accuracy."""
    lines = [
        "| entry | val accuracy | worst group | its accuracy |",
        "|---|---|---|---|",
    ]
    for r in rows:
        if r.get("worst_group", "") == "":
            continue
        whole = (
            f"{r['val_accuracy']:.3f} [{r['val_accuracy_low']:.3f}, {r['val_accuracy_high']:.3f}]"
        )
        worst = (
            f"{r['worst_group_accuracy']:.3f} [{r['worst_group_accuracy_low']:.3f}, "
            f"{r['worst_group_accuracy_high']:.3f}]"
        )
        lines.append(f"| {r['label']} | {whole} | {r['worst_group']} | {worst} |")
    return "\n".join(lines)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def privacy_columns(summary: dict) -> dict:
    """The run's weakest (largest) epsilon and its delta; empty cells without DP."""
    guarantees = list(summary.get("privacy", {}).values())
    if not guarantees:
        return {"epsilon": "", "delta": ""}
    weakest = max(guarantees, key=lambda g: g["epsilon"])
    return {"epsilon": weakest["epsilon"], "delta": weakest["delta"]}


def split_columns(values: dict | None, split: str) -> dict:
    """`{split}_{key}` and its 95% interval `{split}_{key}_low`, `_high` for every scalar and
    the log loss; empty cells for a split the run lacks (no test folder), an interval it lacks
    (older runs wrote no ci95) or a null (a diverged run's NaN, written as null)."""
    values = values or {}
    intervals = values.get("ci95") or {}
    out: dict = {}
    for key in (*SCALARS, "loss"):
        low, high = intervals.get(key) or ("", "")
        cells = {"": values.get(key), "_low": low, "_high": high}
        out |= {f"{split}_{key}{end}": "" if v is None else v for end, v in cells.items()}
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
        if is_diverged(row):
            cells += ["diverged"] * len(SHORT)
        else:
            cells += [metric_cell(row, f"{split}_{key}") for key in SHORT]
        cells += [f"{row['parameters'] / 1e6:.1f} M", duration(row["wall_time_s"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sites_markdown(rows: list[dict]) -> str:
    """Federated entries: their worst and best site's validation figures, MB sent."""
    lines = [
        "| entry | worst site acc | best site acc | worst site AUROC | MB sent |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("worst_site_accuracy", "") == "":
            continue
        cells = [r["label"], *(f"{r[k]:.3f}" for k in ("worst_site_accuracy",
                 "best_site_accuracy", "worst_site_auroc")), f"{r['mb_sent']:.0f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_markdown(comparison: Comparison, rows: list[dict]) -> str:
    parts = [f"# {comparison.name}", comparison.description.strip()]
    reference = comparison.reference or rows[0]["entry"]
    if families(rows, reference):
        parts += family_sections(rows, reference)
    for split, title in SPLITS.items():
        if any(r[f"{split}_accuracy"] != "" for r in rows):
            parts += [f"## {title}", markdown_table(rows, split)]
    if any(r.get("worst_site_accuracy", "") != "" for r in rows):
        parts += ["## Sites and traffic", sites_markdown(rows)]
    if any(r.get("worst_group", "") != "" for r in rows):
        parts += ["## The worst validation subgroup", groups_markdown(rows)]
    thresholds = sorted({str(r["threshold"]) for r in rows if r["threshold"] != ""})
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
            "(DP-SGD protects one training image of one hospital); privacy.png plots "
            "validation AUROC against it, one line per model (entries sharing a family), "
            "each model's entry without DP at the right."
        )
    return "\n\n".join(p for p in parts if p) + "\n"


def families(rows: list[dict], reference: str) -> list[str]:
    """The families in the order the entries first name them; the reference's own family
    counts only if another entry is in it (alone, its table would hold the reference only)."""
    named = (r["family"] for r in rows if r.get("family") and r["entry"] != reference)
    return list(dict.fromkeys(named))


def slug(family: str) -> str:
    """The family's part of its figure's file name: `lr decay` -> `lr_decay`."""
    return re.sub(r"[^a-z0-9]", "_", family.lower())


def family_rows(rows: list[dict], family: str, reference: str) -> list[dict]:
    """The reference's row, then the family's other rows in the config's order."""
    ref = next(r for r in rows if r["entry"] == reference)
    return [ref, *(r for r in rows if r["family"] == family and r is not ref)]


def family_sections(rows: list[dict], reference: str) -> list[str]:
    """Per family: `## <family>`, its table against the reference and its figure; then what
    the markers (and "diverged") mean."""
    parts = []
    for family in families(rows, reference):
        table = family_table(family_rows(rows, family, reference))
        parts += [f"## {family}", table, f"![{family}](family_{slug(family)}.png)"]
    parts.append(MARKER_NOTE)
    if any(is_diverged(r) for r in rows):
        parts.append(DIVERGED_NOTE)
    return parts


def family_table(rows: list[dict]) -> str:
    """One family's Markdown table; rows[0] is the reference every other row is marked
    against."""
    header = ["Entry", *(heading for _, _, heading in FAMILY_COLUMNS), "Best epoch", "Wall time"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    reference = rows[0]
    for row in rows:
        label = f"{row['label']} (reference)" if row is reference else row["label"]
        cells = [label, *(family_cell(row, reference, s, k) for s, k, _ in FAMILY_COLUMNS)]
        best = row["best_epoch_or_round"]
        cells += [str(best) if best != "" and best > 0 else "-", duration(row["wall_time_s"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def family_cell(row: dict, reference: dict, split: str, key: str) -> str:
    if is_diverged(row):
        return "diverged"
    cell = metric_cell(row, f"{split}_{key}")
    if key in MARKED and row is not reference and not is_diverged(reference):
        cell += marker(row, reference, f"{split}_{key}")
    return cell


def marker(row: dict, reference: dict, name: str) -> str:
    """The cell's marker: ▲ when the row's 95% interval lies entirely above the reference's
    value, ▼ entirely below; none when it holds the value or a number is missing (NaN
    compares false)."""
    low, high, value = row[f"{name}_low"], row[f"{name}_high"], reference[name]
    if "" in (low, high, value):
        return ""
    if low > value:
        return " ▲"
    return " ▼" if high < value else ""


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
        for row in read_rows(entry.run_dir / ROUNDS):
            x = int(row["round"]) * entry.passes
            for key in series:
                series[key].append((x, float(row[key])))
        return series
    columns = {
        "train_loss": "train/loss_epoch",
        "val_loss": "val/loss",
        "val_accuracy": "val/accuracy",
    }
    for row in read_rows(entry.run_dir / METRICS):
        for key, column in columns.items():
            if row.get(column):
                series[key].append((int(row["epoch"]) + 1, float(row[column])))
    return series


def read_rows(path: Path) -> list[dict]:
    """The file's rows, none when it is missing (a diverged run may stop before writing it)."""
    return read_csv(path) if path.is_file() else []


def predictions(entry: Entry) -> list[dict]:
    return read_rows(entry.run_dir / PREDICTIONS)


def held_out_rows(entries: list[Entry], summaries: list[dict]) -> list[dict]:
    """Every model scored on a held-out site: the federation over the other sites and each of
    them alone (its cross_site.csv), and the pooled run (its summary's held_out)."""
    rows = []
    for entry, summary in zip(entries, summaries, strict=True):
        site = entry.cfg.federated.hold_out
        if not entry.federated or site is None or "held_out" not in summary:
            continue
        if entry.cfg.federated.pooled:
            values = summary["held_out"]
            ci = values.get("ci95", {})
            cell = {k: round(values[k], 4) for k in ("accuracy", "auroc")}
            cell |= {f"{k}_{end}": round(ci[k][i], 4) for k in cell if k in ci for i, end in
                     enumerate(("low", "high"))}  # fmt: skip
            rows.append({"held_out": site, "model": "centralized over the rest", "n": values["n"]}
                        | cell)  # fmt: skip
            continue
        matrix = entry.run_dir / CROSS_SITE_TABLE
        if not matrix.is_file():
            continue
        with open(matrix, newline="") as f:
            for r in csv.DictReader(f):
                if r["data"] != "held_out":
                    continue
                model = (
                    "federated over the rest"
                    if r["model"] == "global"
                    else r["model"].replace("local_site", "site ") + " alone"
                )
                keys = ("accuracy", "accuracy_low", "accuracy_high", "auroc", "auroc_low",
                        "auroc_high")  # fmt: skip
                rows.append({"held_out": site, "model": model, "n": int(r["n"])}
                            | {k: float(r[k]) for k in keys})  # fmt: skip
    return rows


def held_out_markdown(rows: list[dict]) -> str:
    lines = ["| held-out site | model | n | accuracy | AUROC |", "|---|---|---|---|---|"]
    for r in rows:
        acc = f"{r['accuracy']:.3f} ({r['accuracy_low']:.3f}-{r['accuracy_high']:.3f})"
        auroc = f"{r['auroc']:.3f} ({r['auroc_low']:.3f}-{r['auroc_high']:.3f})"
        lines.append(f"| {r['held_out']} | {r['model']} | {r['n']} | {acc} | {auroc} |")
    return "\n".join(lines)


def write_report(comparison: Comparison) -> Path:
    """Every file of reports/<name>/; returns results.md's path."""
    out = comparison.report_dir
    out.mkdir(parents=True, exist_ok=True)
    entries = comparison.entries
    summaries = [read_summary(e) for e in entries]
    rows = [entry_row(e, summary) for e, summary in zip(entries, summaries, strict=True)]
    write_csv(out / "results.csv", rows)
    markdown = results_markdown(comparison, rows)
    held = held_out_rows(entries, summaries)
    if held:
        write_csv(out / "leave_one_site_out.csv", held)
        markdown += "\n\n## Leave one site out\n\n" + held_out_markdown(held)
    write_text_atomic(out / "results.md", markdown)
    curves = {e.label: curve(e) for e in entries}
    plots.curves(curves, ["val_accuracy"], "accuracy", out / "curves_accuracy.png")
    plots.curves(curves, ["train_loss", "val_loss"], "loss", out / "curves_loss.png")
    aurocs = {r["label"]: {s: r[f"{s}_auroc"] for s in SPLITS} for r in rows}
    # Read once for ROC and reliability; a diverged entry's probabilities (NaN) draw neither.
    scored = {
        e.label: [] if is_diverged(r) else predictions(e)
        for e, r in zip(entries, rows, strict=True)
    }
    plots.roc(scored, aurocs, out / "roc.png")
    for entry, row, summary in zip(entries, rows, summaries, strict=True):
        matrices = {
            s: summary[s]["confusion_matrix"]
            for s in SPLITS
            if "confusion_matrix" in (summary.get(s) or {})
        }
        classes = entry.cfg.positive_class
        if matrices:
            plots.confusion(
                matrices,
                entry.label,
                row["threshold"],
                classes,
                out / f"confusion_{entry.name}.png",
            )
        plots.reliability(
            scored[entry.label], entry.label, classes, out / f"reliability_{entry.name}.png"
        )
        copy_cases_panel(entry, out / f"cases_{entry.name}.png")
    if comparison.sweep:
        sweep_figure(comparison, comparison.sweep, rows)
    reference = comparison.reference or rows[0]["entry"]
    for family in families(rows, reference):
        chosen = family_rows(rows, family, reference)
        plots.family(chosen, family, out / f"family_{slug(family)}.png")
    if any(r["epsilon"] != "" for r in rows):
        plots.privacy(rows, out / "privacy.png")
    return out / "results.md"


def copy_cases_panel(entry: Entry, target: Path) -> None:
    """The entry's Grad-CAM panel of its most confident correct and wrong validation decisions
    (drawn by the run: `pneumonia.run.finalize`), beside the entry's other figures."""
    source = entry.run_dir / CASES
    if source.is_file():  # runs from before heatmaps have none
        write_bytes_atomic(target, source.read_bytes())


def sweep_figure(comparison: Comparison, sweep: dict, rows: list[dict]) -> None:
    """The comparison's `sweep` plot (its config's sweep: x, line, metric, file)."""
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
