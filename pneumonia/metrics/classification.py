"""Binary diagnosis metrics (torchmetrics) and their figures, and the one validation loss.

The positive class is PNEUMONIA by default, so recall is sensitivity and specificity is the
recall of NORMAL. Scalars are thresholded at `threshold`; AUROC and the ROC curve are not.
`binary_log_loss` is the loss every validation reports (the module's val/loss, a federation's
rounds, the final scoring): the log loss of P(positive), whatever the number of classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
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
from torchmetrics.functional.classification import binary_calibration_error
from torchmetrics.utilities.data import dim_zero_cat

# Where binary_log_loss clips P(positive): one confident mistake costs -log(1e-7) = 16 nats.
LOG_LOSS_CLIP = 1e-7
SCALARS = ("accuracy", "precision", "recall", "f1", "specificity", "auroc", "ece")
# Bins of the expected calibration error and of the reliability diagram.
CALIBRATION_BINS = 10


class DiagnosisMetrics(nn.Module):
    """Accumulates positive-class probabilities and targets; computes every metric at once."""

    def __init__(self, threshold: float = 0.5) -> None:
        super().__init__()
        # No argument validation: probabilities and 0/1 targets are valid by construction, and
        # the checks read tensor values, a host synchronisation per update on a GPU.
        self.scalars = MetricCollection(
            {
                "accuracy": BinaryAccuracy(threshold, validate_args=False),
                "precision": BinaryPrecision(threshold, validate_args=False),
                "recall": BinaryRecall(threshold, validate_args=False),
                "f1": BinaryF1Score(threshold, validate_args=False),
                "specificity": BinarySpecificity(threshold, validate_args=False),
                "auroc": BinaryAUROC(validate_args=False),
                # |observed - predicted| frequency of the positive class, over 10 equal bins.
                "ece": BinaryCalibrationError(
                    n_bins=CALIBRATION_BINS, norm="l1", validate_args=False
                ),
            }
        )
        self.confusion = BinaryConfusionMatrix(threshold, validate_args=False)
        self.roc = BinaryROC(validate_args=False)

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
        assert isinstance(ax, Axes)  # one metric, one panel (torchmetrics types an array too)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        fig_roc, ax = self.roc.plot(score=True)
        assert isinstance(ax, Axes)
        ax.set_title("ROC (positive: " + class_names[1] + ")")
        with self.roc.sync_context():  # every process's images, on N processes (DDP)
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


def binary_log_loss(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean unweighted log loss of P(positive) `probs` against boolean `targets`, in float64
    (a 0-d tensor on their device; nan for no images or a nan probability). Probabilities are
    clipped to [1e-7, 1 - 1e-7]: one confident mistake costs 16 nats, not torch's cap of 100.

    With two classes this is mathematically the softmax cross-entropy of the logits that
    validation logged before; the values differ only in the last float digits (P is float32,
    so an image whose 1 - P is tiny, a confident mistake, loses the most). With three it is
    the diagnosis's (pneumonia vs normal) loss, not the three-class cross-entropy, so a
    val/loss monitor selects on the same quantity centrally and in a federation."""
    # MPS has no float64: its float32 differs in the seventh digit.
    dtype = torch.float32 if probs.device.type == "mps" else torch.float64
    if not len(probs):
        return torch.tensor(float("nan"), dtype=dtype, device=probs.device)
    p = probs.detach().to(dtype).clamp(LOG_LOSS_CLIP, 1 - LOG_LOSS_CLIP)
    if torch.isnan(p).any():  # a diverged model: its loss is nan (binary_cross_entropy raises)
        return torch.tensor(float("nan"), dtype=dtype, device=probs.device)
    return F.binary_cross_entropy(p, targets.to(dtype))


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
        n = len(classes)
        self.collection = MetricCollection(
            {
                "class_accuracy": MulticlassAccuracy(n, average="micro", validate_args=False),
                "precision": MulticlassPrecision(n, average="none", validate_args=False),
                "recall": MulticlassRecall(n, average="none", validate_args=False),
                "f1": MulticlassF1Score(n, average="none", validate_args=False),
                "auroc": MulticlassAUROC(n, average="none", validate_args=False),
            }
        )
        self.confusion = MulticlassConfusionMatrix(n, validate_args=False)

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
        assert isinstance(ax, Axes)  # one metric, one panel (torchmetrics types an array too)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        return fig

    def reset(self) -> None:
        self.collection.reset()
        self.confusion.reset()
