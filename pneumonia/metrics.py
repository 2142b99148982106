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
    BinaryConfusionMatrix,
    BinaryF1Score,
    BinaryPrecision,
    BinaryRecall,
    BinaryROC,
    BinarySpecificity,
)

SCALARS = ("accuracy", "precision", "recall", "f1", "specificity", "auroc")


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
        return {"confusion_matrix": fig_cm, "roc": fig_roc}

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
