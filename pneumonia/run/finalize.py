"""The end of every run, centralized or federated alike: score the reported model (best.ckpt)
on validation (and test), choose its decision threshold and write it into the checkpoint,
write every image's probability, and log best/* to TensorBoard; then print the summary."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from pneumonia.core.files import write_csv
from pneumonia.data.sources import Splits
from pneumonia.inference.explain import cases_panel, seeded_panel
from pneumonia.inference.scoring import (
    evaluate_imageset,
    predict_class_probabilities,
    predict_probabilities,
    score,
    score_classes,
    score_groups,
    score_with_intervals,
    site_indices,
)
from pneumonia.metrics.classification import SCALARS, youden_threshold
from pneumonia.training.checkpoint import finish_checkpoint, module_from, read_checkpoint
from pneumonia.training.module import ClassifierModule


@dataclass
class Trained:
    """What `train_centralized` and `train_federated` both return."""

    unit: str  # "epoch" or "round": what best.ckpt's step counts
    checkpoint: Path  # the reported model
    selected_by: str  # how it was chosen, in words
    logger: TensorBoardLogger  # the run's own events file
    details: dict = field(default_factory=dict)  # summary keys of this kind of run
    hparams_metrics: dict = field(default_factory=dict)  # for TensorBoard's HPARAMS tab


def choose_threshold(module: ClassifierModule, splits: Splits, rule: float | str, bs: int) -> float:
    """The decision threshold: a fixed number, or "youden" chosen on the validation images."""
    if rule != "youden":
        return float(rule)
    probs = predict_probabilities(module, splits.val.images, bs)
    return youden_threshold(probs, module.is_positive(splits.val.labels))


def finalize(
    trained: Trained,
    splits: Splits,
    batch_size: int,
    threshold: float | str,
    run_dir: Path,
    config: dict,
) -> dict:
    """Score best.ckpt and choose its threshold (written back into the checkpoint, so
    everything that loads it decides alike); the summary's training part: the kind's details,
    best_<unit>, selected_by, threshold, val, val_shift, test, ("val_at_0.5" when the threshold
    moved). Writes predictions.csv: every image's P(positive), for ROC curves and error
    analysis without re-running the model."""
    if trained.details.get("diverged") and not finite_checkpoint(trained.checkpoint):
        return unscored(trained, threshold)
    recipe, state, ckpt = read_checkpoint(trained.checkpoint)
    # Trained at 0.5: a finalize interrupted after writing its choice back must not, on
    # resume, take that choice for the training threshold (and drop val_at_0.5).
    recipe = recipe.with_threshold(0.5)
    module = module_from(recipe, state, trained.checkpoint)
    chosen = choose_threshold(module, splits, threshold, batch_size)
    results: dict = {"threshold": round(chosen, 6), "threshold_rule": str(threshold)}
    if chosen != recipe.threshold:
        results["val_at_0.5"], _ = evaluate_imageset(module, splits.val, batch_size)
        module = module_from(recipe.with_threshold(chosen), state, trained.checkpoint)
    tensorboard = trained.logger.experiment
    rows = []
    for name, imageset in splits.evaluation_sets().items():
        class_probs, probs = probabilities(module, imageset, batch_size)
        values, metrics = score_with_intervals(module, probs, imageset)
        if class_probs is not None:  # three classes: per-class figures beside the binary ones
            values["classes"], per_class = score_classes(module, imageset, class_probs)
            figure = per_class.confusion_figure()
            tensorboard.add_figure(f"best/{name}/confusion_matrix_classes", figure, 0)
        results[name] = values
        rows += prediction_rows(name, imageset, probs, module, class_probs)
        if name == "val_shift":
            results["val_shift_by_kind"] = by_shift_kind(module, imageset, probs)
        if name == "val" and splits.val_site is not None:
            results["val_by_site"] = by_site(module, imageset, probs, splits.val_site)
        if name in ("val", "val_shift") and (groups := score_groups(module, imageset, probs)):
            results[f"{name}_by_group"] = groups
            for family, figures in groups.items():
                tensorboard.add_scalar(f"best/{name}_by_group/{family}", figures["accuracy"], 0)
        for key, value in values.items():
            if isinstance(value, float):
                tensorboard.add_scalar(f"best/{name}/{key}", value, 0)
        for fig_name, figure in metrics.figures(module.negative_and_positive).items():
            tensorboard.add_figure(f"best/{name}/{fig_name}", figure, 0)
        if name == "val":
            log_heatmaps(tensorboard, module, imageset, probs, run_dir)
    tensorboard.flush()
    write_csv(run_dir / "predictions.csv", rows)
    if trained.hparams_metrics:
        trained.logger.log_hyperparams(config, trained.hparams_metrics)
    best = {f"best_{trained.unit}": int(ckpt[trained.unit]), "selected_by": trained.selected_by}
    summary = trained.details | best | results
    if worst := worst_groups(summary):
        summary["worst_group"] = worst
    card = model_card_of(summary, splits, config, module.negative_and_positive[1])
    finish_checkpoint(trained.checkpoint, ckpt, chosen, card)
    return summary


def finite_checkpoint(path: Path) -> bool:
    """Whether `path` holds a checkpoint whose every float tensor is finite."""
    if not path.is_file():
        return False
    _, state, _ = read_checkpoint(path)
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def unscored(trained: Trained, threshold: float | str) -> dict:
    """The summary of a run that diverged before any finite checkpoint: nothing to score."""
    print("the training loss diverged (NaN or inf) before any finite checkpoint: nothing scored")
    return trained.details | {
        f"best_{trained.unit}": 0,
        "selected_by": "none: the training loss diverged before any finite checkpoint",
        "threshold": 0.5 if threshold == "youden" else float(threshold),
        "threshold_rule": str(threshold),
    }


def log_heatmaps(tensorboard, module: ClassifierModule, val, probs, run_dir: Path) -> None:
    """Grad-CAM of the reported model: a fixed, seeded panel of validation images in
    TensorBoard (best/gradcam), and its most confident correct and wrong validation decisions
    in cases.png (comparison reports show it beside each entry)."""
    tensorboard.add_figure("best/gradcam", seeded_panel(module, val), 0)
    figure = cases_panel(module, val, probs)
    figure.savefig(run_dir / "cases.png", dpi=110)
    plt.close(figure)


def model_card_of(summary: dict, splits: Splits, config: dict, positive: str) -> dict:
    """What a user of the model should know, as plain values (it travels in best.ckpt):
    the data it learned from, how it was chosen, its figures with intervals, its threshold."""
    train = splits.train
    card = {
        "task": f"{' vs '.join(train.classes)} on chest radiographs; positive class {positive}",
        "trained_on": {
            "source": splits.source,
            "images": len(train),
            "patients": len(set(train.patients)),
            "per_class": dict(zip(train.classes, train.class_counts(), strict=True)),
            "image_size": config["data"]["image_size"],
        },
        "training": {"selected_by": summary["selected_by"]}
        | ({"federated": _federation(summary["federated"])} if "federated" in summary else {}),
        "model": config["model"]["name"],
        "threshold": summary["threshold"],
        "threshold_rule": summary["threshold_rule"],
        "seed": config.get("seed"),
    }
    for name in ("val", "val_shift", "test", "held_out"):  # test: a data.root with a test/
        if name in summary:
            card[name] = _figures(summary[name])
    if "worst_group" in summary:  # the group the model serves worst, beside the averages
        card["worst_group"] = summary["worst_group"]
    if "privacy" in summary:
        card["privacy"] = privacy_statement(summary["privacy"])
    card["caveat"] = CAVEAT
    return card


def privacy_statement(privacy: dict) -> dict:
    """Each guarantee as (epsilon, delta) with what it protects, for the model card."""
    protects = {
        "dp_sgd": "one training image",
        "clients": "one training image of one hospital (per hospital's own accountant)",
        "server": "a whole hospital's participation",
    }
    return {
        name: {
            "mechanism": values["mechanism"],
            "epsilon": values["epsilon"],
            "delta": values["delta"],
            "protects": protects[name],
        }
        for name, values in privacy.items()
    }


CAVEAT = (
    "A research tool, not a diagnostic device: its figures are measured on validation "
    "images cut from its own training pool (and on those images under simulated acquisition "
    "shifts), which new patients and other hospitals can fall well short of."
)


def _federation(fed: dict) -> dict:
    return {k: fed[k] for k in ("strategy", "partition", "clients", "rounds", "local_epochs")}


def _figures(values: dict) -> dict:
    """Scalar metrics rounded, each with its 95% interval, and n."""
    ci = values.get("ci95", {})
    out = {k: round(values[k], 4) for k in SCALARS if k in values}
    out["ci95"] = {k: [round(lo, 4), round(hi, 4)] for k, (lo, hi) in ci.items() if k in out}
    return out | {"n": values["n"]}


def by_site(module: ClassifierModule, val, probs, val_site: torch.Tensor) -> dict[str, dict]:
    """Every metric with its 95% interval on each site's validation images."""
    return {
        f"site{j}": score_with_intervals(module, probs[index], val.subset(index))[0]
        for j, index in site_indices(val_site).items()
    }


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


def probabilities(module, imageset, batch_size: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(class probabilities [N, C] with three classes, else None; P(positive) [N])."""
    if module.positive is not None:
        return None, predict_probabilities(module, imageset.images, batch_size)
    class_probs = predict_class_probabilities(module, imageset.images, batch_size)
    return class_probs, class_probs[:, module.positives].sum(1)


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


# Short names for the one-line summary, so a line with intervals fits a terminal.
SHORT = {"accuracy": "acc", "precision": "prec", "specificity": "spec"}


def format_metrics(values: dict) -> str:
    """One line of the scalar metrics, each with its 95% interval when there is one."""
    intervals = values.get("ci95", {})

    def one(key: str) -> str:
        low_high = intervals.get(key)
        ci = f" [{low_high[0]:.3f}, {low_high[1]:.3f}]" if low_high else ""
        return f"{SHORT.get(key, key)} {values[key]:.3f}{ci}"

    return "  ".join(one(k) for k in SCALARS) + f"  (n={values['n']})"


def print_summary(summary: dict, best_key: str, summary_path: Path) -> None:
    """The model's metrics with 95% intervals (by patient), and how model and threshold were
    chosen."""
    label = best_key.replace("_", " ")
    print(f"model: {summary['selected_by']} ({label} {summary[best_key]})")
    if "val_at_0.5" in summary:
        print(f"val at threshold 0.5: {format_metrics(summary['val_at_0.5'])}")
        rule = summary["threshold_rule"]
        print(
            f"threshold {summary['threshold']:.3f} ({rule}, chosen on the clean validation "
            f"images: the val line below is optimistic; val_shift shows what it does elsewhere)"
        )
    for name in ("val", "val_shift", "test", "held_out"):
        if name in summary:
            print(f"{name:9s} {format_metrics(summary[name])}")
            if "classes" in summary[name]:
                print(f"{'':9s} {format_classes(summary[name]['classes'])}")
    for site, values in summary.get("val_by_site", {}).items():
        print(f"  val {site:5s} {format_metrics(values)}")
    print_groups(summary)
    if "cross_site" in summary:
        print("cross-site accuracy (model on site):")
        for row in summary["cross_site"]:
            print(
                f"  {row['model']:12s} on {row['data']:8s} {row['accuracy']:.3f} "
                f"[{row['accuracy_low']:.3f}, {row['accuracy_high']:.3f}]  auroc {row['auroc']:.3f}"
            )
    if "transfer" in summary:
        t = summary["transfer"]
        print(
            f"transfer {t['mode']}: froze {', '.join(t['frozen']) or 'nothing'} "
            f"({t['frozen_parameters']:,} parameters); {t['trainable_parameters']:,} trained"
        )
    print(f"summary: {summary_path}  (intervals: 95% bootstrap over patients)")


def print_groups(summary: dict) -> None:
    """Accuracy by file-name family with intervals (a one-class family's accuracy is its
    specificity or recall), and a warning for a group the average hides."""
    for name in ("val", "val_shift"):
        groups = summary.get(f"{name}_by_group", {})
        if groups:
            cells = []
            for family, values in groups.items():
                low, high = values["ci95"]["accuracy"]
                accuracy = f"{values['accuracy']:.3f} [{low:.3f}, {high:.3f}]"
                cells.append(f"{family} {accuracy} (n={values['n']})")
            print(f"  {name} acc by file family: " + "; ".join(cells))
    for name, worst in summary.get("worst_group", {}).items():
        if worst["hidden"]:
            low, high = worst["ci95"]
            print(
                f"warning: {name} group {worst['group']} has accuracy {worst['accuracy']:.3f} "
                f"[{low:.3f}, {high:.3f}], wholly below the {name} average's interval: the "
                f"average hides it"
            )


def format_classes(values: dict) -> str:
    """One line of three-class figures: accuracy, macro F1, and each class's recall (with
    95% intervals), then the confusion matrix (rows true, columns predicted)."""
    ci = values.get("ci95", {})

    def one(key: str, short: str) -> str:
        low, high = ci.get(key, (float("nan"), float("nan")))
        return f"{short} {values[key]:.3f} [{low:.3f}, {high:.3f}]"

    classes = [k.removeprefix("recall_") for k in values if k.startswith("recall_")]
    parts = [one("class_accuracy", "3-class acc"), one("macro_f1", "macro F1")]
    parts += [one(f"recall_{c}", f"recall {c}") for c in classes]
    return "  ".join(parts) + f"  confusion {values['class_confusion_matrix']}"
