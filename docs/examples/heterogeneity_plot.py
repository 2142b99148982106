"""AUROC with 95% intervals of every heterogeneity_cpu entry: methods by partition, clean and
shift validation side by side (the plot in docs/results/sites.md).

    python docs/examples/heterogeneity_plot.py --summaries docs/results/heterogeneity_cpu \\
        --out docs/results/heterogeneity_cpu/auroc.png

Reads summary_<partition>_<method>.json (copies of the entries' summary.json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PARTITIONS = {
    "iid": "IID",
    "shift": "feature shift",
    "label": "label skew\n(Dirichlet 0.5)",
    "both": "label skew (0.5)\n+ feature shift",
    "label1": "label skew\n(Dirichlet 1)",
    "both1": "label skew (1)\n+ feature shift",
}
METHODS = {
    "fedavg": "FedAvg",
    "fedprox": "FedProx",
    "fedbn": "FedBN",
    "fedadam": "FedAdam",
    "pooled": "pooled",
}
SETS = {"val": "clean validation", "val_shift": "shift validation"}


def auroc(summary: dict, split: str) -> tuple[float, float, float]:
    """(AUROC, low, high) of one validation set."""
    low, high = summary[split]["ci95"]["auroc"]
    return summary[split]["auroc"], low, high


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summaries", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    figure, axes = plt.subplots(1, len(SETS), figsize=(14, 4), sharey=True)
    width = 0.8 / len(METHODS)
    for ax, (split, title) in zip(axes, SETS.items(), strict=True):
        for m, (method, label) in enumerate(METHODS.items()):
            for p, partition in enumerate(PARTITIONS):
                path = args.summaries / f"summary_{partition}_{method}.json"
                if not path.exists():
                    continue
                value, low, high = auroc(json.loads(path.read_text()), split)
                x = p + (m - (len(METHODS) - 1) / 2) * width
                ax.errorbar(
                    x, value, yerr=[[value - low], [high - value]], fmt="o", ms=4, capsize=2,
                    color=f"C{m}", label=label if p == 0 else None,
                )  # fmt: skip
        ax.set_xticks(range(len(PARTITIONS)), list(PARTITIONS.values()), fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("AUROC (95% interval by patient)")
    axes[0].legend(fontsize=8, loc="lower left", ncol=3)
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
