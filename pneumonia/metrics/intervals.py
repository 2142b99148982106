"""95% bootstrap confidence intervals of the diagnosis metrics, resampled by patient.

Images of one patient are not independent (Kermany patients have up to a dozen), so a
replicate draws patients with replacement and takes all of each drawn patient's images (the
cluster bootstrap); with no patient ids every image is its own patient. All replicates are
computed at once from a [replicates, images] weight matrix: image i counts as often as its
patient was drawn, so a replicate is a weighted confusion matrix and a weighted AUROC.
"""

from __future__ import annotations

import torch

from pneumonia.metrics.classification import CALIBRATION_BINS

REPLICATES = 1000
LEVEL = 0.95


def patient_weights(patients: list[str] | None, n: int, replicates: int, seed: int) -> torch.Tensor:
    """[replicates, n] float64: how often each image is drawn in each replicate."""
    if patients is None:
        patients = [str(i) for i in range(n)]
    ids: dict[str, int] = {}
    index = torch.tensor([ids.setdefault(p, len(ids)) for p in patients], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    drawn = torch.randint(len(ids), (replicates, len(ids)), generator=g)
    counts = torch.zeros(replicates, len(ids), dtype=torch.float64)
    counts.scatter_add_(1, drawn, torch.ones_like(drawn, dtype=torch.float64))
    return counts[:, index]


def weighted_metrics(
    probs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, threshold: float
) -> dict[str, torch.Tensor]:
    """Each metric for each row of `weights` [R, n] (a row of ones is the plain metric)."""
    p, t = probs.double(), targets.bool()
    predicted = p > threshold  # torchmetrics' rule: a probability equal to it is negative
    tp = (weights * (predicted & t)).sum(1)
    fp = (weights * (predicted & ~t)).sum(1)
    fn = (weights * (~predicted & t)).sum(1)
    tn = (weights * (~predicted & ~t)).sum(1)
    total = tp + fp + fn + tn
    out = {
        "accuracy": (tp + tn) / total,
        "precision": tp / (tp + fp),
        "recall": tp / (tp + fn),
        "f1": 2 * tp / (2 * tp + fp + fn),
        "specificity": tn / (tn + fp),
        "auroc": _weighted_auroc(p, t, weights),
        "ece": _weighted_ece(p, t, weights),
    }
    q = p.clamp(1e-7, 1 - 1e-7)
    log_loss = -torch.where(t, q.log(), (1 - q).log())
    out["loss"] = (weights * log_loss).sum(1) / total
    return out


def _weighted_auroc(p: torch.Tensor, t: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """P(score of a positive > score of a negative), ties counting one half, per row."""
    order = torch.argsort(p)
    _, group = torch.unique_consecutive(p[order], return_inverse=True)
    w, pos = weights[:, order], t[order]
    groups = int(group.max()) + 1 if len(group) else 0
    neg_g = torch.zeros(len(w), groups, dtype=w.dtype).index_add_(1, group, w * ~pos)
    pos_g = torch.zeros(len(w), groups, dtype=w.dtype).index_add_(1, group, w * pos)
    neg_below = neg_g.cumsum(1) - neg_g
    wins = (pos_g * (neg_below + 0.5 * neg_g)).sum(1)
    return wins / (pos_g.sum(1) * neg_g.sum(1))


def _weighted_ece(p: torch.Tensor, t: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The ECE of `pneumonia.metrics.classification` (10 bins of P(positive)), per row of
    weights."""
    bins = (p * CALIBRATION_BINS).long().clamp(0, CALIBRATION_BINS - 1)
    n = torch.zeros(len(weights), CALIBRATION_BINS, dtype=weights.dtype)
    predicted, observed = n.clone(), n.clone()
    n.index_add_(1, bins, weights)
    predicted.index_add_(1, bins, weights * p)
    observed.index_add_(1, bins, weights * t)
    return (predicted - observed).abs().sum(1) / n.sum(1)


def bootstrap_intervals(
    probs: torch.Tensor,
    targets: torch.Tensor,
    threshold: float = 0.5,
    patients: list[str] | None = None,
    replicates: int = REPLICATES,
    seed: int = 0,
    level: float = LEVEL,
) -> dict[str, list[float]]:
    """Percentile interval [low, high] of every metric; the same seed gives the same
    intervals. A replicate where a metric is undefined (no positive drawn) is left out."""
    weights = patient_weights(patients, len(probs), replicates, seed)
    return _percentiles(weighted_metrics(probs, targets, weights, threshold), level)


def weighted_class_metrics(
    probs: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...], weights: torch.Tensor
) -> dict[str, torch.Tensor]:
    """`ClassMetrics`' figures for each row of `weights` [R, n]: class_accuracy, and per class
    (one against the rest, at the arg-max) precision, recall, F1 and AUROC, with macro means."""
    predicted = probs.argmax(1)
    out = {"class_accuracy": (weights * (predicted == labels)).sum(1) / weights.sum(1)}
    per: dict[str, list[torch.Tensor]] = {"precision": [], "recall": [], "f1": [], "auroc": []}
    for c, name in enumerate(classes):
        t, d = labels == c, predicted == c
        tp, fp, fn = (
            (weights * (d & t)).sum(1),
            (weights * (d & ~t)).sum(1),
            (weights * (~d & t)).sum(1),
        )
        values = {
            "precision": tp / (tp + fp),
            "recall": tp / (tp + fn),
            "f1": 2 * tp / (2 * tp + fp + fn),
            "auroc": _weighted_auroc(probs[:, c].double(), t, weights),
        }
        for key, v in values.items():
            out[f"{key}_{name}"] = v
            per[key].append(v)
    for key, series in per.items():
        out[f"macro_{key}"] = torch.stack(series).mean(0)
    return out


def class_intervals(
    probs: torch.Tensor,
    labels: torch.Tensor,
    patients: list[str] | None = None,
    classes: tuple[str, ...] | None = None,
    replicates: int = REPLICATES,
    seed: int = 0,
    level: float = LEVEL,
) -> dict[str, list[float]]:
    """`bootstrap_intervals` for the three-class figures of class probabilities [N, C]."""
    classes = classes or tuple(str(c) for c in range(probs.shape[1]))
    weights = patient_weights(patients, len(probs), replicates, seed)
    values = weighted_class_metrics(probs.double(), labels.long(), classes, weights)
    return _percentiles(values, level)


def _percentiles(values: dict[str, torch.Tensor], level: float) -> dict[str, list[float]]:
    tail = (1 - level) / 2
    out = {}
    for name, v in values.items():
        v = v[torch.isfinite(v)]
        if len(v) == 0:
            out[name] = [float("nan"), float("nan")]
            continue
        low, high = torch.quantile(v, torch.tensor([tail, 1 - tail], dtype=v.dtype)).tolist()
        out[name] = [round(low, 4), round(high, 4)]
    return out
