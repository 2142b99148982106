"""Scoring a model on decoded images: probabilities in large batches, then every metric (with
intervals by patient). The library under `python -m pneumonia.evaluate`, the round-by-round
evaluation of a federation and the final report of every run."""

from __future__ import annotations

import contextlib
import warnings

import torch
from tqdm.auto import tqdm

from pneumonia.data.groups import family_groups
from pneumonia.data.imageset import ImageSet
from pneumonia.data.transforms import tta_views
from pneumonia.metrics.classification import ClassMetrics, DiagnosisMetrics, binary_log_loss
from pneumonia.metrics.intervals import bootstrap_intervals, class_intervals
from pneumonia.training.module import ClassifierModule


def predict_probabilities(
    module: ClassifierModule,
    images: torch.Tensor,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool = False,
    tta: bool = False,
) -> torch.Tensor:
    """P(positive class) for uint8 images [N, 1, S, S], on `device` (default: the module's).
    With `tta`, the mean probability over a fixed set of small zooms and shifts."""
    return _predict(module, images, module.positive_probability, batch_size, device, progress, tta)


def predict_class_probabilities(
    module: ClassifierModule,
    images: torch.Tensor,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool = False,
    tta: bool = False,
) -> torch.Tensor:
    """The softmax over every class [N, C] (three classes: P(pneumonia) is the sum of all
    but NORMAL's)."""
    softmax = lambda logits: logits.float().softmax(dim=1)  # noqa: E731
    return _predict(module, images, softmax, batch_size, device, progress, tta)


@torch.inference_mode()
def _predict(module, images, probability, batch_size, device, progress, tta) -> torch.Tensor:
    device = torch.device(device) if device is not None else module.device
    module = module.to(device).eval()
    # Mixed precision only where it pays and is safe: CUDA.
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )
    out = []
    starts = range(0, len(images), batch_size)
    # A fixed front end's features, computed once for these images (the same validation
    # images every round of a federation); TTA's views are new images.
    features = None if tta else module.fixed_features(images)
    source = images if features is None else features
    with autocast:
        for start in tqdm(starts, desc="evaluate", unit="batch", leave=False, disable=not progress):
            batch = source[start : start + batch_size].to(device, non_blocking=True)
            views = tta_views(batch.float() / 255.0) if tta else [batch]
            probs = [probability(module(view)).float() for view in views]
            out.append(torch.stack(probs).mean(0).cpu())
    return torch.cat(out) if out else torch.empty(0)


def evaluate_imageset(
    module: ClassifierModule,
    imageset: ImageSet,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool = False,
    tta: bool = False,
) -> tuple[dict, DiagnosisMetrics]:
    """Metrics of `module` on `imageset` ("loss": `binary_log_loss`, every scalar, the
    confusion matrix and n), and the filled metric object for figures."""
    probs = predict_probabilities(module, imageset.images, batch_size, device, progress, tta)
    return score(module, probs, imageset.labels)


def evaluate_sets(
    module: ClassifierModule,
    sets: dict[str, ImageSet],
    batch_size: int = 256,
    device: torch.device | str | None = None,
    val_site: torch.Tensor | None = None,
) -> dict[str, dict]:
    """`evaluate_imageset`'s metrics on each named image set (val, val_shift, test,
    held_out); with `val_site` (the site of each validation image) also "site<j>_val", the
    metrics on site j's validation images, from the same probabilities."""
    out = {}
    for name, imageset in sets.items():
        probs = predict_probabilities(module, imageset.images, batch_size, device)
        out[name] = score(module, probs, imageset.labels)[0]
        if name == "val" and val_site is not None:
            for j, index in site_indices(val_site).items():
                out[f"site{j}_val"] = score(module, probs[index], imageset.labels[index])[0]
    return out


def site_indices(val_site: torch.Tensor) -> dict[int, torch.Tensor]:
    """Site -> the indices of its validation images (sites in order; -1, no site, left out)."""
    sites = sorted(set(val_site.tolist()) - {-1})
    return {j: torch.nonzero(val_site == j).flatten() for j in sites}


def score(
    module: ClassifierModule, probs: torch.Tensor, labels: torch.Tensor
) -> tuple[dict, DiagnosisMetrics]:
    """Metrics of probabilities P(positive) against class labels, at the module's threshold."""
    targets = module.is_positive(labels)
    metrics = DiagnosisMetrics(module.hparams["threshold"])
    metrics.update(probs, targets)
    values = {"loss": float(binary_log_loss(probs, targets))} | metrics.compute()
    if len(targets) and bool(targets.all() | ~targets.any()):
        values["auroc"] = float("nan")  # one class only (a site's few patients): no ranking
    return values, metrics


def score_with_intervals(
    module: ClassifierModule, probs: torch.Tensor, imageset: ImageSet, seed: int = 0
) -> tuple[dict, DiagnosisMetrics]:
    """`score`, plus "ci95": a 95% bootstrap interval of each metric, resampled by patient."""
    values, metrics = score(module, probs, imageset.labels)
    targets = module.is_positive(imageset.labels)
    threshold = float(module.hparams["threshold"])
    values["ci95"] = bootstrap_intervals(probs, targets, threshold, imageset.patients, seed=seed)
    return values, metrics


def score_groups(module: ClassifierModule, images: ImageSet, probs, seed: int = 0) -> dict:
    """Every metric with its 95% interval on each file-name family of `images`
    (`pneumonia.data.groups`); empty when the names carry no grouping."""
    with warnings.catch_warnings():  # a one-class family: torchmetrics warns, figures are nan
        warnings.filterwarnings("ignore", message="No (positive|negative) samples in targets")
        return {
            family: score_with_intervals(module, probs[index], images.subset(index), seed)[0]
            for family, index in family_groups(images.names).items()
        }


def score_classes(module: ClassifierModule, imageset: ImageSet, probs: torch.Tensor, seed=0):
    """Three-class figures (`ClassMetrics`) of class probabilities [N, C], with "ci95": 95%
    intervals by patient of each per-class and macro figure; and the filled metric object."""
    metrics = ClassMetrics(module.classes)
    metrics.update(probs, imageset.labels)
    ci95 = class_intervals(probs, imageset.labels, imageset.patients, module.classes, seed=seed)
    return {**metrics.compute(), "ci95": ci95}, metrics
