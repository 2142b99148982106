"""The comparison's figures: learning curves (the paper's Fig. 5 and 6), ROC, confusion
matrices, reliability diagrams, a sweep (Table 2 as accuracy against batch size), one
AUROC chart per family of a study against its reference and, for private entries, AUROC
against epsilon with a line per model. Files only, never a screen."""

from __future__ import annotations

import math

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torchmetrics.classification import BinaryConfusionMatrix
from torchmetrics.functional.classification import binary_roc

from pneumonia.core.figures import subplots
from pneumonia.metrics.classification import reliability_figure

X_LABEL = "passes over the training images\n(centralized: epoch; federated: round x local epochs)"
TITLES = {
    "train_loss": "training loss",
    "val_loss": "validation loss",
    "val_accuracy": "validation accuracy",
}
FAMILY_SPLITS = {"val": "clean validation", "val_shift": "shift validation"}
PRIVACY_MARKERS = "os^Dv"  # one per model of the privacy plot, with its colour


def save(fig: Figure, path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def curves(series: dict[str, dict], keys: list[str], ylabel: str, path) -> None:
    """One panel per key, one line per entry."""
    fig, axes = subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for label, entry in series.items():
            points = entry[key]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", markersize=3, label=label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole passes, unless E x C < 1
        ax.set_title(TITLES.get(key, key))
        ax.set_xlabel(X_LABEL)
        ax.set_ylabel(ylabel)
        if ylabel == "loss":
            ax.set_yscale("log")  # a first epoch's loss can be 10x the rest (VGG here)
        ax.grid(alpha=0.3, which="both")
    axes[0][-1].legend(fontsize=8)
    save(fig, path)


def roc(predictions: dict[str, list[dict]], aurocs: dict[str, dict], path) -> None:
    """ROC of every entry's best checkpoint; one panel per split the predictions hold. The
    legend's AUROC is the results table's (`aurocs[label][split]`), so the two always agree."""
    # predictions.csv lists val, val_shift, test in that order: keep it for the panels.
    splits = list(dict.fromkeys(row["split"] for rows in predictions.values() for row in rows))
    fig, axes = subplots(
        1, max(len(splits), 1), figsize=(5 * max(len(splits), 1), 4.5), squeeze=False
    )
    for ax, split in zip(axes[0], splits, strict=False):
        for label, rows in predictions.items():
            scored = split_scores(rows, split)
            if scored is None:
                continue
            fpr, tpr, _ = binary_roc(*scored)
            ax.plot(fpr, tpr, label=f"{label} (AUROC {aurocs[label][split]:.3f})")
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"ROC, {split} split")
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity (recall)")
        ax.legend(fontsize=8, loc="lower right")
    save(fig, path)


def split_scores(rows: list[dict], split: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(P(positive), 1 if positive) of predictions.csv's rows of `split`; None if it has none."""
    chosen = [r for r in rows if r["split"] == split]
    if not chosen:
        return None
    probs = torch.tensor([float(r["probability"]) for r in chosen])
    return probs, torch.tensor([int(r["positive"]) for r in chosen])


def reliability(rows: list[dict], label: str, positive: str, path) -> None:
    """Reliability diagram of one entry on the shifted validation images, where calibration
    matters (a model is deployed on new scanners), or on the clean ones if the run has none."""
    for split in ("val_shift", "val"):
        scored = split_scores(rows, split)
        if scored is not None:
            fig = reliability_figure(*scored, positive)
            fig.axes[0].set_title(f"{label}: reliability, {split} split")
            save(fig, path)
            return


def confusion(matrices: dict[str, list], label: str, threshold: float, positive: str, path) -> None:
    """[[TN, FP], [FN, TP]] per split, counts written in the cells."""
    negative = "NORMAL" if positive == "PNEUMONIA" else "PNEUMONIA"
    names = [negative, positive]
    fig, axes = subplots(1, len(matrices), figsize=(4 * len(matrices), 3.6), squeeze=False)
    for ax, (split, matrix) in zip(axes[0], matrices.items(), strict=True):
        # torchmetrics draws it as the training's TensorBoard figures do.
        BinaryConfusionMatrix().plot(val=torch.tensor(matrix), ax=ax, labels=names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{split} split")
    fig.suptitle(f"{label} (threshold {float(threshold):.3g})")
    save(fig, path)


def sweep(points: list[tuple], x: str, line: str, ylabel: str, path) -> None:
    """points: (x value, line name, y); one line per name, x sorted (log2 for batch sizes)."""
    fig, ax = subplots(figsize=(5.5, 4))
    for name in sorted({p[1] for p in points}):
        chosen = sorted((p[0], p[2]) for p in points if p[1] == name)
        xs, ys = zip(*chosen, strict=True)
        ax.plot(xs, ys, marker="o", label=f"{line} = {name}")
    if all(isinstance(p[0], int) and p[0] > 0 for p in points):
        ax.set_xscale("log", base=2)
        ax.set_xticks(
            sorted({p[0] for p in points}), [str(v) for v in sorted({p[0] for p in points})]
        )
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, path)


def privacy(rows: list[dict], path) -> Figure:
    """AUROC (95% intervals) against epsilon, one line per model (the rows' `family`; rows
    without one form the line "all entries"), in a panel per split: clean validation and, when
    present, shift validation. A family's entries without DP sit at the right, at "no DP".
    Rows without a finite value (a diverged run) draw no point. Returns the figure."""
    lines = _privacy_lines(rows)
    splits = [s for s in FAMILY_SPLITS if any(_finite(r[f"{s}_auroc"]) for r in rows)]
    splits = splits or ["val"]
    epsilons = [r["epsilon"] for r in rows if r["epsilon"] != ""]
    far = max(epsilons, default=1.0) * 2.5  # where "no DP" is drawn on the log axis
    fig, axes = subplots(
        1, len(splits), figsize=(5 * len(splits) + 2.5, 4.2), sharey=True, squeeze=False
    )
    for ax, split in zip(axes[0], splits, strict=True):
        for index, (name, chosen) in enumerate(lines.items()):
            # Each family nudged sideways (on the log axis) so the intervals do not hide
            # each other; the same colour, marker and nudge in every panel.
            style = {"color": f"C{index % 10}", "marker": PRIVACY_MARKERS[index % 5]}
            nudge = 1.06 ** (index - (len(lines) - 1) / 2)
            _privacy_line(ax, chosen, f"{split}_auroc", far, nudge, name, style)
        ax.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="chance")
        _epsilon_axis(ax, epsilons, far, plain=any(r["epsilon"] == "" for r in rows))
        ax.set_title(f"AUROC, {FAMILY_SPLITS[split]}")
    axes[0][0].set_ylabel("AUROC (95% interval, bootstrap over patients)")
    # The models in order, then chance (matplotlib lists plain lines before error bars);
    # outside the last panel, where tight_layout makes room for it.
    handles, labels = axes[0][-1].get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: labels[i] == "chance")
    axes[0][-1].legend(
        [handles[i] for i in order],
        [labels[i] for i in order],
        fontsize=8,
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
    )
    save(fig, path)
    return fig


def _privacy_lines(rows: list[dict]) -> dict[str, list[dict]]:
    """The rows of each family, in the order the rows first name them."""
    lines: dict[str, list[dict]] = {}
    for r in rows:
        lines.setdefault(r.get("family") or "all entries", []).append(r)
    return lines


def _privacy_line(
    ax, rows: list[dict], key: str, far: float, nudge: float, name: str, style: dict
) -> None:
    """One family: its private entries joined by a line, its no-DP entries at `far` (not
    joined: "no DP" is no epsilon). The legend names the family once."""
    drawn = [r for r in rows if r.get("diverged") != "yes" and _finite(r[key])]
    private = sorted((r for r in drawn if r["epsilon"] != ""), key=lambda r: r["epsilon"])
    plain = [r for r in drawn if r["epsilon"] == ""]
    label = name
    for chosen, xs, linestyle in (
        (private, [r["epsilon"] * nudge for r in private], "-"),
        (plain, [far * nudge] * len(plain), "none"),
    ):
        if chosen:
            ys = [r[key] for r in chosen]
            errors = _interval_errors(chosen, key)
            ax.errorbar(xs, ys, yerr=errors, linestyle=linestyle, capsize=3, label=label, **style)
            label = "_nolegend_"  # matplotlib's "leave me out of the legend"


def _epsilon_axis(ax, epsilons: list[float], far: float, plain: bool) -> None:
    """Log epsilon axis, a tick per group of near-equal epsilons, and "no DP" at `far` when an
    entry has none. The models' accountants stop a hair apart below a shared target (7.95,
    7.99, 8.0): one tick, at and named by the group's largest, keeps the labels apart."""
    groups: list[list[float]] = []
    for x in sorted(epsilons):
        if groups and x <= groups[-1][0] * 1.15:
            groups[-1].append(x)
        else:
            groups.append([x])
    positions = [group[-1] for group in groups]
    labels = [f"{x:.2g}" for x in positions]
    if plain:
        positions, labels = [*positions, far], [*labels, "no DP"]
    ax.set_xscale("log")
    ax.set_xticks(positions, labels)
    ax.minorticks_off()
    ax.set_xlabel("epsilon per client (delta as in the table)")
    ax.grid(alpha=0.3)


def _interval_errors(rows: list[dict], key: str) -> list[list[float]]:
    """Error bar lengths below and above each value (0 where a row has no interval, or where
    the rounded interval ends a hair inside the unrounded value: matplotlib refuses negative
    lengths)."""
    below, above = [], []
    for r in rows:
        low, high, value = r[f"{key}_low"], r[f"{key}_high"], r[key]
        has = low != "" and high != "" and not (math.isnan(low) or math.isnan(high))
        below.append(max(value - low, 0.0) if has else 0.0)
        above.append(max(high - value, 0.0) if has else 0.0)
    return [below, above]


def family(rows: list[dict], title: str, path) -> None:
    """AUROC and its 95% interval, one row per entry and one panel per split: rows[0] is the
    reference, drawn on top and as a dashed line to read the others against. A diverged entry
    keeps its row, labelled, without a point."""
    splits = [s for s in FAMILY_SPLITS if any(_finite(r[f"{s}_auroc"]) for r in rows)]
    splits = splits or ["val"]  # every entry diverged: still one panel of labelled rows
    height = 1.4 + 0.4 * len(rows)
    fig, axes = subplots(
        1, len(splits), figsize=(5 * len(splits), height), sharey=True, squeeze=False
    )
    for ax, split in zip(axes[0], splits, strict=True):
        _family_panel(ax, rows, f"{split}_auroc")
        ax.set_title(f"AUROC, {FAMILY_SPLITS[split]}")
    labels = [f"{rows[0]['label']} (reference)", *(r["label"] for r in rows[1:])]
    axes[0][0].set_yticks(range(len(rows)), labels)
    axes[0][0].set_ylim(len(rows) - 0.5, -0.5)  # the reference on top
    fig.suptitle(title)
    fig.supxlabel("AUROC with its 95% interval (bootstrap over patients)", fontsize=10)
    save(fig, path)


def _family_panel(ax, rows: list[dict], key: str) -> None:
    reference = rows[0][key]
    if _finite(reference) and rows[0].get("diverged") != "yes":
        ax.axvline(reference, color="grey", linestyle="--", linewidth=1)
    for y, row in enumerate(rows):
        if row.get("diverged") == "yes" or not _finite(row[key]):
            # x in axes fraction, y in rows: the label sits in the row whatever the x range.
            words = "diverged" if row.get("diverged") == "yes" else "no value"
            at = ax.get_yaxis_transform()
            ax.text(0.5, y, words, transform=at, ha="center", va="center", color="grey")
            continue
        colour = "black" if y == 0 else "C0"
        errors = _interval_errors([row], key)
        ax.errorbar([row[key]], [y], xerr=errors, fmt="o", color=colour, capsize=3)
    ax.grid(alpha=0.3, axis="x")


def _finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)
