"""Binary diagnosis metrics (torchmetrics) and their figures.

The positive class is PNEUMONIA by default, so recall is sensitivity and specificity is the
recall of NORMAL. Scalars are thresholded at `threshold`; AUROC and the ROC curve are not.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # figures are rendered to files and TensorBoard, never to a screen

import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import nn  # noqa: E402
from torchmetrics import MetricCollection  # noqa: E402
from torchmetrics.classification import (  # noqa: E402
    BinaryAccuracy,
    BinaryAUROC,
    BinaryCalibrationError,
    BinaryConfusionMatrix,
    BinaryF1Score,
    BinaryPrecision,
    BinaryRecall,
    BinaryROC,
    BinarySpecificity,
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)
from torchmetrics.functional.classification import binary_calibration_error  # noqa: E402
from torchmetrics.utilities.data import dim_zero_cat  # noqa: E402

SCALARS = ("accuracy", "precision", "recall", "f1", "specificity", "auroc", "ece")
# Bins of the expected calibration error and of the reliability diagram.
CALIBRATION_BINS = 10


class DiagnosisMetrics(nn.Module):
    """Accumulates positive-class probabilities and targets; computes every metric at once."""

    def __init__(self, threshold: float = 0.5) -> None:
        super().__init__()
        # No argument validation: probabilities and 0/1 targets are valid by construction, and
        # the checks read tensor values, a host synchronisation per update on a GPU.
        kw = {"validate_args": False}
        self.scalars = MetricCollection(
            {
                "accuracy": BinaryAccuracy(threshold, **kw),
                "precision": BinaryPrecision(threshold, **kw),
                "recall": BinaryRecall(threshold, **kw),
                "f1": BinaryF1Score(threshold, **kw),
                "specificity": BinarySpecificity(threshold, **kw),
                "auroc": BinaryAUROC(**kw),
                # |observed - predicted| frequency of the positive class, over 10 equal bins.
                "ece": BinaryCalibrationError(n_bins=CALIBRATION_BINS, norm="l1", **kw),
            }
        )
        self.confusion = BinaryConfusionMatrix(threshold, **kw)
        self.roc = BinaryROC(**kw)

    def update(self, probs: torch.Tensor, targets: torch.Tensor) -> None:
        """probs: P(positive) per image; targets: 1 for the positive class, else 0."""
        probs, targets = probs.detach().float(), targets.detach().long()
        self.scalars.update(probs, targets)
        self.confusion.update(probs, targets)
        self.roc.update(probs, targets)

    def compute(self) -> dict[str, float | list]:
        """Scalars as floats, plus confusion_matrix [[TN, FP], [FN, TP]] and n."""
        values: dict[str, float | list] = {k: float(v) for k, v in self.scalars.compute().items()}
        matrix = self.confusion.compute()
        values["confusion_matrix"] = matrix.long().tolist()
        values["n"] = int(matrix.sum())
        return values

    def figures(self, class_names: tuple[str, str]) -> dict[str, Figure]:
        """The confusion matrix and ROC curve as matplotlib figures."""
        fig_cm, ax = self.confusion.plot(labels=list(class_names))
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        fig_roc, ax = self.roc.plot(score=True)
        ax.set_title("ROC (positive: " + class_names[1] + ")")
        probs, targets = dim_zero_cat(self.roc.preds), dim_zero_cat(self.roc.target)
        fig_rel = reliability_figure(probs, targets, class_names[1])
        return {"confusion_matrix": fig_cm, "roc": fig_roc, "reliability": fig_rel}

    def has_updates(self) -> bool:
        """Whether any image was scored since the last reset."""
        return self.confusion.update_called

    def reset(self) -> None:
        self.scalars.reset()
        self.confusion.reset()
        self.roc.reset()


def youden_threshold(probs: torch.Tensor, targets: torch.Tensor) -> float:
    """The threshold that maximises Youden's J = sensitivity + specificity - 1 on these
    images (ties: the highest such threshold)."""
    from torchmetrics.functional.classification import binary_roc

    fpr, tpr, thresholds = binary_roc(probs.float(), targets.long())
    j = tpr - fpr
    best = torch.nonzero(j == j.max()).flatten()
    # thresholds descend; the first is 1 by convention (nothing called positive).
    return float(thresholds[best[0]].clamp(0.0, 1.0))


def reliability_bins(
    probs: torch.Tensor, targets: torch.Tensor, n_bins: int = CALIBRATION_BINS
) -> list[dict]:
    """Equal-width bins of P(positive): each bin's image count, mean predicted probability
    and observed positive fraction (empty bins left out)."""
    probs, targets = probs.detach().float().cpu(), targets.detach().float().cpu()
    index = (probs * n_bins).long().clamp(0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        inside = index == b
        n = int(inside.sum())
        if n:
            rows.append(
                {
                    "bin": b,
                    "n": n,
                    "predicted": float(probs[inside].mean()),
                    "observed": float(targets[inside].mean()),
                }
            )
    return rows


def reliability_figure(probs: torch.Tensor, targets: torch.Tensor, positive: str) -> Figure:
    """Reliability diagram: observed against predicted frequency per bin, bar width by count."""
    rows = reliability_bins(probs, targets)
    fig = Figure(figsize=(4.2, 4.2))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="calibrated")
    if rows:
        ax.plot(
            [r["predicted"] for r in rows],
            [r["observed"] for r in rows],
            marker="o",
            label=f"model (ECE {calibration_error(probs, targets):.3f})",
        )
        ax2 = ax.twinx()
        ax2.bar(
            [(r["bin"] + 0.5) / CALIBRATION_BINS for r in rows],
            [r["n"] for r in rows],
            width=0.9 / CALIBRATION_BINS,
            alpha=0.15,
            color="C0",
        )
        ax2.set_ylabel("images per bin")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"predicted P({positive})")
    ax.set_ylabel(f"observed fraction {positive}")
    ax.set_title("reliability")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def calibration_error(probs: torch.Tensor, targets: torch.Tensor) -> float:
    """The expected calibration error that DiagnosisMetrics reports as "ece"."""
    return float(
        binary_calibration_error(
            probs.float(), targets.long(), n_bins=CALIBRATION_BINS, validate_args=False
        )
    )


class ClassMetrics(nn.Module):
    """Three-class (or more) figures from class probabilities [N, C] and labels: accuracy;
    precision, recall and F1 of each class (one against the rest at the arg-max) and their
    unweighted (macro) means; one-vs-rest AUROC of each class and its macro mean; the C x C
    confusion matrix (rows true, columns predicted). The pneumonia-vs-normal figures stay with
    DiagnosisMetrics on the summed pneumonia probability."""

    def __init__(self, classes: tuple[str, ...]) -> None:
        super().__init__()
        self.classes = tuple(classes)
        k = {"num_classes": len(classes), "validate_args": False}
        self.collection = MetricCollection(
            {
                "class_accuracy": MulticlassAccuracy(average="micro", **k),
                "precision": MulticlassPrecision(average="none", **k),
                "recall": MulticlassRecall(average="none", **k),
                "f1": MulticlassF1Score(average="none", **k),
                "auroc": MulticlassAUROC(average="none", **k),
            }
        )
        self.confusion = MulticlassConfusionMatrix(**k)

    def update(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        probs, labels = probs.detach().float(), labels.detach().long()
        self.collection.update(probs, labels)
        self.confusion.update(probs, labels)

    def compute(self) -> dict[str, float | list]:
        """class_accuracy; precision/recall/f1/auroc_<CLASS> and macro_<metric>; the matrix
        as class_confusion_matrix."""
        values: dict[str, float | list] = {}
        for name, value in self.collection.compute().items():
            if value.ndim == 0:
                values[name] = float(value)
                continue
            for cls, v in zip(self.classes, value.tolist(), strict=True):
                values[f"{name}_{cls}"] = float(v)
            values[f"macro_{name}"] = float(value.mean())
        values["class_confusion_matrix"] = self.confusion.compute().long().tolist()
        return values

    def confusion_figure(self) -> Figure:
        fig, ax = self.confusion.plot(labels=list(self.classes))
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        return fig

    def reset(self) -> None:
        self.collection.reset()
        self.confusion.reset()
