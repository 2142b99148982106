"""Tables and a figure of three-class runs, from their summary.json files.

    python docs/examples/three_class_report.py runs/three_class_centralized_cpu/version_0 \
        runs/three_class_fl_cpu/version_0 --out docs/results/three_class

Prints markdown tables (binary figures of P(pneumonia); per-class precision, recall, F1 and
one-vs-rest AUROC with 95% intervals by patient; the 3x3 confusion matrices) and writes
confusion.png: each run's validation confusion matrix, rows normalised to the true class.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CLASSES = ("NORMAL", "BACTERIA", "VIRUS")


def cell(values: dict, key: str, ci: dict) -> str:
    low, high = ci.get(key, (float("nan"), float("nan")))
    return f"{values[key]:.3f} ({low:.3f}-{high:.3f})"


def name_of(summary: dict) -> str:
    fed = summary.get("federated")
    if fed:
        return (
            f"FL-SE-ResNet-18-GN, {fed['clients']} clients, {fed['rounds']} x {fed['local_epochs']}"
        )
    return "SE-ResNet-18-GN, centralized"


def tables(runs: dict[str, dict], split: str) -> str:
    lines = [
        f"**{split}**: P(pneumonia) = P(BACTERIA) + P(VIRUS) against NORMAL, at threshold 0.5",
        "",
        "| run | reported model | wall time | acc | recall | spec | AUROC | 3-class acc | macro F1 "
        "| macro AUROC |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in runs.items():
        v, c = s[split], s[split]["classes"]
        minutes, seconds = divmod(round(s["wall_time_s"]), 60)
        lines.append(
            f"| {name} | {s['selected_by']} | {minutes} min {seconds} s | "
            + " | ".join(
                cell(v, k, v["ci95"]) for k in ("accuracy", "recall", "specificity", "auroc")
            )
            + " | "
            + " | ".join(
                cell(c, k, c["ci95"]) for k in ("class_accuracy", "macro_f1", "macro_auroc")
            )
            + " |"
        )
    lines += [
        "",
        "| run | class | precision | recall | F1 | AUROC (one vs rest) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in runs.items():
        c = s[split]["classes"]
        for cls in CLASSES:
            lines.append(
                f"| {name} | {cls} | "
                + " | ".join(
                    cell(c, f"{m}_{cls}", c["ci95"]) for m in ("precision", "recall", "f1", "auroc")
                )
                + " |"
            )
    lines += [
        "",
        "| run | true \\ predicted | NORMAL | BACTERIA | VIRUS |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, s in runs.items():
        for cls, row in zip(CLASSES, s[split]["classes"]["class_confusion_matrix"], strict=True):
            lines.append(f"| {name} | {cls} | " + " | ".join(str(n) for n in row) + " |")
    return "\n".join(lines)


def figure(runs: dict[str, dict], path: Path) -> None:
    fig, axes = plt.subplots(1, len(runs), figsize=(4.4 * len(runs), 4))
    for ax, (name, s) in zip(list(axes) if len(runs) > 1 else [axes], runs.items(), strict=True):
        matrix = s["val"]["classes"]["class_confusion_matrix"]
        share = [[n / max(sum(row), 1) for n in row] for row in matrix]
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for i, row in enumerate(matrix):
            for j, n in enumerate(row):
                ax.text(j, i, f"{n}\n{share[i][j]:.0%}", ha="center", va="center",
                        color="white" if share[i][j] > 0.5 else "black", fontsize=9)  # fmt: skip
        ax.set_xticks(range(3), CLASSES)
        ax.set_yticks(range(3), CLASSES)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(name, fontsize=9)
    fig.suptitle("Three classes, clean validation (rows: share of the true class)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories holding summary.json")
    parser.add_argument("--out", default=None, help="folder for confusion.png and tables.md")
    args = parser.parse_args()
    runs = {}
    for folder in args.runs:
        summary = json.loads((Path(folder) / "summary.json").read_text())
        runs[name_of(summary)] = summary
    text = "\n\n".join(tables(runs, split) for split in ("val", "val_shift"))
    print(text)
    if args.out:
        out = Path(args.out)
        figure(runs, out / "confusion.png")
        out.mkdir(parents=True, exist_ok=True)
        (out / "tables.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
