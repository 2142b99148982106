"""The end of every run, centralized or federated alike: score the reported model (best.ckpt)
on validation (and test), choose its decision threshold and write it, with the model card,
into the checkpoint, and write every image's probability (predictions.csv). This module owns
the threshold and the order of the steps; the figures are `pneumonia.run.scores`', the
pictures `pneumonia.run.panels`', the card `pneumonia.run.card`'s and the console lines
`pneumonia.run.console`'s."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from pneumonia.core.files import write_csv
from pneumonia.data.sources import Splits
from pneumonia.inference.scoring import evaluate_imageset, predict_probabilities
from pneumonia.metrics.classification import youden_threshold
from pneumonia.run.card import model_card
from pneumonia.run.inputs import Trained
from pneumonia.run.panels import log_set
from pneumonia.run.rundir import PREDICTIONS
from pneumonia.run.scores import score_set, worst_groups
from pneumonia.run.sites import label_sites
from pneumonia.training.checkpoint import finish_checkpoint, module_from, read_checkpoint
from pneumonia.training.module import ClassifierModule
from pneumonia.training.recipe import Recipe

log = logging.getLogger(__name__)


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
    module, chosen, results = thresholded(
        recipe.with_threshold(0.5), state, trained.checkpoint, splits, threshold, batch_size
    )
    tensorboard = trained.logger.experiment
    rows = []
    for name, imageset in splits.evaluation_sets().items():
        scores = score_set(module, name, imageset, splits.val_site, batch_size)
        log_set(tensorboard, module, scores, run_dir)
        results |= scores.summary()
        rows += scores.rows
    tensorboard.flush()
    write_csv(run_dir / PREDICTIONS, rows)
    if trained.hparams_metrics:
        trained.logger.log_hyperparams(config, trained.hparams_metrics)
    best = {f"best_{trained.unit}": int(ckpt[trained.unit]), "selected_by": trained.selected_by}
    summary = trained.details | best | results
    label_sites(summary)
    if worst := worst_groups(summary):
        summary["worst_group"] = worst
    card = model_card(summary, splits, config, module.negative_and_positive[1])
    finish_checkpoint(trained.checkpoint, ckpt, chosen, card)
    return summary


def thresholded(
    recipe: Recipe, state: dict, path: Path, splits: Splits, rule: float | str, bs: int
) -> tuple[ClassifierModule, float, dict]:
    """The reported model at the threshold `rule` chooses, that threshold, and the summary's
    threshold, threshold_rule (and val_at_0.5 when the threshold moved from the recipe's)."""
    module = module_from(recipe, state, path)
    chosen = choose_threshold(module, splits, rule, bs)
    results: dict = {"threshold": round(chosen, 6), "threshold_rule": str(rule)}
    if chosen != recipe.threshold:
        results["val_at_0.5"], _ = evaluate_imageset(module, splits.val, bs)
        module = module_from(recipe.with_threshold(chosen), state, path)
    return module, chosen, results


def finite_checkpoint(path: Path) -> bool:
    """Whether `path` holds a checkpoint whose every float tensor is finite."""
    if not path.is_file():
        return False
    _, state, _ = read_checkpoint(path)
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def unscored(trained: Trained, threshold: float | str) -> dict:
    """The summary of a run that diverged before any finite checkpoint: nothing to score."""
    log.info("the training loss diverged (NaN or inf) before any finite checkpoint: nothing scored")
    return trained.details | {
        f"best_{trained.unit}": 0,
        "selected_by": "none: the training loss diverged before any finite checkpoint",
        "threshold": 0.5 if threshold == "youden" else float(threshold),
        "threshold_rule": str(threshold),
    }
