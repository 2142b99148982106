"""The reported model's figures on each evaluation set (val, val_shift, test, held_out): every
metric with its 95% interval by patient, and the breakdowns summary.json keeps beside them
(per class, per site, per shift kind, per file-name group, the worst group); and every image's
row of predictions.csv. Computing only: `pneumonia.run.panels` draws, `finalize` writes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pneumonia.data.imageset import ImageSet
from pneumonia.inference.scoring import (
    predict_class_probabilities,
    predict_probabilities,
    score,
    score_classes,
    score_groups,
    score_with_intervals,
    site_indices,
)
from pneumonia.metrics.classification import ClassMetrics, DiagnosisMetrics
from pneumonia.training.module import ClassifierModule


@dataclass
class SetScores:
    """One evaluation set scored: summary.json's `name` entry and the keys beside it."""

    name: str
    imageset: ImageSet
    probs: torch.Tensor  # P(positive) [N]
    values: dict  # every metric with "ci95" (and "classes" with three classes)
    metrics: DiagnosisMetrics  # filled: its figures
    per_class: ClassMetrics | None  # three classes: filled, for the class confusion figure
    breakdowns: dict  # val_by_site, val_shift_by_kind, <name>_by_group: those that apply
    rows: list[dict]  # predictions.csv's

    def summary(self) -> dict:
        return {self.name: self.values} | self.breakdowns


def score_set(
    module: ClassifierModule,
    name: str,
    imageset: ImageSet,
    val_site: torch.Tensor | None,
    batch_size: int,
) -> SetScores:
    """Evaluation set `name` scored by `module`; `val_site`: each validation image's site."""
    class_probs, probs = probabilities(module, imageset, batch_size)
    values, metrics = score_with_intervals(module, probs, imageset)
    per_class = None
    if class_probs is not None:  # three classes: per-class figures beside the binary ones
        values["classes"], per_class = score_classes(module, imageset, class_probs)
    rows = prediction_rows(name, imageset, probs, module, class_probs)
    found = breakdowns(module, name, imageset, probs, val_site)
    return SetScores(name, imageset, probs, values, metrics, per_class, found, rows)


def breakdowns(module, name: str, imageset: ImageSet, probs, val_site) -> dict:
    """The set's figures by shift kind (val_shift), by site (val of a federation) and by
    file-name group (val and val_shift, where the names form groups)."""
    out = {}
    if name == "val_shift":
        out["val_shift_by_kind"] = by_shift_kind(module, imageset, probs)
    if name == "val" and val_site is not None:
        out["val_by_site"] = by_site(module, imageset, probs, val_site)
    if name in ("val", "val_shift") and (groups := score_groups(module, imageset, probs)):
        out[f"{name}_by_group"] = groups
    return out


def probabilities(module, imageset, batch_size: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(class probabilities [N, C] with three classes, else None; P(positive) [N])."""
    if module.positive is not None:
        return None, predict_probabilities(module, imageset.images, batch_size)
    class_probs = predict_class_probabilities(module, imageset.images, batch_size)
    return class_probs, class_probs[:, module.positives].sum(1)


def by_site(module: ClassifierModule, val, probs, val_site: torch.Tensor) -> dict[str, dict]:
    """Every metric with its 95% interval on each site's validation images."""
    return {
        f"site{j}": score_with_intervals(module, probs[index], val.subset(index))[0]
        for j, index in site_indices(val_site).items()
    }


def by_shift_kind(module: ClassifierModule, imageset, probs) -> dict[str, dict]:
    """Accuracy, recall, specificity and AUROC of the shifted images of each kind (each kind
    holds about an eighth of the validation images, so these are rough)."""
    kinds = [name.rsplit("#", 1)[-1] for name in imageset.names]
    out = {}
    for kind in dict.fromkeys(kinds):
        index = [i for i, k in enumerate(kinds) if k == kind]
        values, _ = score(module, probs[index], imageset.labels[index])
        out[kind] = {k: round(values[k], 4) for k in ("accuracy", "recall", "specificity", "auroc")}
        out[kind]["n"] = len(index)
    return out


def worst_groups(summary: dict) -> dict[str, dict]:
    """For val and val_shift: the subgroup (file-name family or site) of lowest accuracy, with
    its interval, and whether that interval lies wholly below the whole set's (`hidden`: the
    average hides a group the model serves worse)."""
    out = {}
    for name in ("val", "val_shift"):
        groups = dict(summary.get(f"{name}_by_group", {}))
        if name == "val":
            groups |= summary.get("val_by_site", {})
        if not groups or name not in summary:
            continue
        group, values = min(groups.items(), key=lambda item: item[1]["accuracy"])
        low, high = values["ci95"]["accuracy"]
        whole_low = summary[name]["ci95"]["accuracy"][0]
        out[name] = {
            "group": group,
            "accuracy": round(values["accuracy"], 4),
            "ci95": [round(low, 4), round(high, 4)],
            "n": values["n"],
            "hidden": bool(high < whole_low),
        }
    return out


def prediction_rows(split: str, imageset, probs, module, class_probs=None) -> list[dict]:
    """One row per image: its split, name, patient, whether it is positive, P(positive); with
    three classes also its class and each class's probability (p_<CLASS>)."""
    positive = module.is_positive(imageset.labels).tolist()
    rows = [
        {
            "split": split,
            "image": name,
            "patient": patient,
            "positive": int(pos),
            "probability": p,  # unrounded: rounding makes ties that move AUROC
        }
        for name, patient, pos, p in zip(
            imageset.names, imageset.patients, positive, probs.tolist(), strict=True
        )
    ]
    if class_probs is not None:
        for row, label, p in zip(rows, imageset.labels.tolist(), class_probs.tolist(), strict=True):
            row["class"] = imageset.classes[label]
            row |= {f"p_{c}": v for c, v in zip(imageset.classes, p, strict=True)}
    return rows
