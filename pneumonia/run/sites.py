"""A federation judged site by site: each site's validation patients, the held-out site of a
leave-one-site-out run, and the cross-site matrix (every site's local model and the global
model on every site's validation images, the matrix NVFlare reports). Sites are keyed
site<j> everywhere; hospital folders (federated.partition sites) add their names: the
partition table's `site_name` column, summary.json's federated.site_names and each
val_by_site entry's `site_name`."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch
from jsonargparse import Namespace

from pneumonia.core.figures import subplots
from pneumonia.core.files import write_csv
from pneumonia.data.imageset import ImageSet
from pneumonia.data.partition import site_names
from pneumonia.data.sites import image_site, site_profiles, validation_sites
from pneumonia.data.sources import Splits, concat
from pneumonia.federated.client import Client
from pneumonia.federated.cohort import Cohort, LocalCohort
from pneumonia.federated.options import shifts_sites, simulates_sites
from pneumonia.inference.scoring import predict_probabilities, score_with_intervals
from pneumonia.metrics.classification import youden_threshold
from pneumonia.run.rundir import (
    CROSS_SITE_FIGURE,
    CROSS_SITE_TABLE,
    LOCAL,
    best_checkpoint,
    local_checkpoint,
)
from pneumonia.training.checkpoint import checkpoint_round, load_module, write_checkpoint
from pneumonia.training.module import ClassifierModule
from pneumonia.training.recipe import Recipe, build_module

log = logging.getLogger(__name__)

# The figures of each cell of the cross-site matrix (with their 95% intervals).
MATRIX_METRICS = ("accuracy", "auroc", "recall", "specificity")
# Noise of a site's validation images: another draw than its training images'.
VAL_NOISE = 1


def with_sites(splits: Splits, cfg: Namespace, cohort: Cohort) -> Splits:
    """`splits` with every validation image's site (`val_site`); with federated.site_shift the
    validation images re-imaged by their sites; with federated.hold_out that site's validation
    patients moved, with its training images, to `held_out`."""
    fed = cfg.federated
    # A deployment's nodes hold no part of these; federated.engine simulation's nodes split
    # the run's data as LocalCohort does (the options that reshape sites are refused there).
    if not isinstance(cohort, LocalCohort) and fed.engine == "local":
        return replace(splits, raw_train=None, raw_val=None)
    folders = site_names(splits.train) if fed.partition == "sites" else None
    val_site = validation_sites(splits.val, cohort.site_table, cfg.seed, folders)
    val = splits.val
    if shifts_sites(fed):
        # From the images before data.intensity's standardisation (then standardised).
        raw = splits.raw_val if splits.raw_val is not None else val
        images = val.images.clone()
        for j, profile in enumerate(site_profiles(len(cohort.site_table), fed.site_seed)):
            index = torch.nonzero(val_site == j).flatten()
            if len(index):
                seed = fed.site_seed + VAL_NOISE
                site = image_site(raw.subset(index), j, profile, seed, cfg.data.intensity)
                images[index] = site.images
        val = replace(val, images=images)
    # The raw images have served (the cohort re-imaged its sites already).
    out = replace(splits, val=val, val_site=val_site, raw_train=None, raw_val=None)
    if fed.hold_out is None:
        return out
    held_out = cohort.held_out
    assert held_out is not None  # a LocalCohort keeps the site federated.hold_out names
    keep = torch.nonzero(val_site != fed.hold_out).flatten()
    gone = torch.nonzero(val_site == fed.hold_out).flatten()
    held = concat(held_out, val.subset(gone)) if len(gone) else held_out
    shift = splits.val_shift.subset(keep) if splits.val_shift is not None else None
    away = set(held_out.names)  # split.csv and the model card: what trained
    train = splits.train.subset([i for i, n in enumerate(splits.train.names) if n not in away])
    return replace(
        out,
        train=train,
        val=val.subset(keep),
        val_site=val_site[keep],
        val_shift=shift,
        held_out=held,
    )


def site_names_record(cohort: Cohort) -> dict[str, str]:
    """Each site's folder name (federated.partition sites) by its key in the per-site outputs
    (val_by_site, rounds.csv's site<j>_ columns, cross_site.csv): {"site0": "north", ...};
    empty for simulated sites, which have only their index. Each client's sites are its
    partition-table row's `site_name`."""
    rows = enumerate(cohort.site_table)
    return {f"site{j}": row["site_name"] for j, row in rows if "site_name" in row}


def label_sites(summary: dict) -> None:
    """Give each val_by_site entry its site's folder name (`site_name`), where it has one."""
    names = summary.get("federated", {}).get("site_names") or {}
    for key, values in summary.get("val_by_site", {}).items():
        if key in names:
            values["site_name"] = names[key]


def refuse_for_deployments(cfg: Namespace) -> str | None:
    """Why a deployment (real sites) cannot take these options, or None."""
    if simulates_sites(cfg.federated):
        return (
            "federated.site_shift, sites_shift, hold_out, pooled and cross_site reshape "
            "simulated sites: a deployment's sites are real (drop them)"
        )
    return None


# -- the cross-site matrix -----------------------------------------------------------------


def train_local_models(cfg: Namespace, recipe: Recipe, cohort: LocalCohort, run_dir: Path) -> dict:
    """Each kept site's model trained on its own images alone for rounds x local_epochs epochs
    from the seed's initial weights: checkpoints/local_site<j>.ckpt, site -> path. A model
    already there (a resumed run) is kept, unless it was trained for fewer rounds (a resume
    given more)."""
    fed = cfg.federated
    torch.manual_seed(cfg.seed)
    start = build_module(recipe).state_dict()
    paths = {}
    for c, sites in enumerate(cohort.client_sites):
        site = sites[0]
        path = local_checkpoint(run_dir, site)
        paths[site] = path
        if path.is_file() and checkpoint_round(path) == fed.rounds:
            continue
        epochs = fed.rounds * fed.local_epochs
        log.info(f"cross-site: site {site}'s local model, {epochs} epochs on its own images")
        client = Client(c, cohort.data[c], cohort.settings, recipe, run_dir / LOCAL)
        update = client.train_round(start, 0, epochs, lr=cfg.optim.lr)
        write_checkpoint(path, update.state, recipe, fed.rounds)
    return paths


def local_threshold(
    module: ClassifierModule, own: ImageSet | None, rule: float | str, bs: int
) -> float:
    """A local model's threshold by the run's rule, chosen on its own site's validation
    (0.5 for youden when the site's validation holds fewer than two classes)."""
    if rule != "youden":
        return float(rule)
    if own is None or len(set(module.is_positive(own.labels).tolist())) < 2:
        return 0.5  # no validation patients, or one class only: nothing to choose on
    probs = predict_probabilities(module, own.images, bs)
    return youden_threshold(probs, module.is_positive(own.labels))


def data_sets(splits: Splits) -> dict[str, ImageSet]:
    """The matrix's columns: each site's validation images, then the held-out site's."""
    val_site = splits.val_site
    assert val_site is not None  # with_sites gives a federated run's splits their sites
    out = {}
    for j in sorted(set(val_site.tolist()) - {-1}):
        out[f"site{j}"] = splits.val.subset(torch.nonzero(val_site == j).flatten())
    if splits.held_out is not None:
        out["held_out"] = splits.held_out
    return out


def cross_site_matrix(
    cfg: Namespace, splits: Splits, models: dict[str, ClassifierModule], run_dir: Path
) -> list[dict]:
    """Every model on every site's validation data, with 95% intervals by patient:
    cross_site.csv (one row per cell) and cross_site.png (accuracy heat map)."""
    columns = data_sets(splits)
    rows = []
    for model_name, module in models.items():
        for data_name, images in columns.items():
            probs = predict_probabilities(module, images.images, cfg.data.eval_batch_size)
            values, _ = score_with_intervals(module, probs, images)
            row = {"model": model_name, "data": data_name, "n": len(images)}
            for key in MATRIX_METRICS:
                low, high = values["ci95"].get(key, [float("nan")] * 2)
                row |= {key: round(values[key], 4), f"{key}_low": round(low, 4)}
                row |= {f"{key}_high": round(high, 4)}
            rows.append(row | {"loss": round(values["loss"], 4)})
    write_csv(run_dir / CROSS_SITE_TABLE, rows)
    figure = matrix_figure(rows, list(models), list(columns))
    figure.savefig(run_dir / CROSS_SITE_FIGURE, dpi=120, bbox_inches="tight")
    return rows


def matrix_figure(rows: list[dict], models: list[str], columns: list[str], metric="accuracy"):
    """Models down, data sets across; each cell its figure and interval."""
    cell = {(r["model"], r["data"]): r for r in rows}
    values = torch.tensor([[cell[m, d][metric] for d in columns] for m in models])
    figure, ax = subplots(figsize=(1.6 * len(columns) + 2, 0.7 * len(models) + 1.5))
    image = ax.imshow(values.numpy(), cmap="viridis", vmin=max(float(values.min()) - 0.05, 0))
    for i, m in enumerate(models):
        for k, d in enumerate(columns):
            r = cell[m, d]
            text = f"{r[metric]:.3f}\n({r[f'{metric}_low']:.2f}-{r[f'{metric}_high']:.2f})"
            ax.text(k, i, text, ha="center", va="center", fontsize=8, color="white")
    ax.set_xticks(range(len(columns)), [c.replace("_", " ") for c in columns])
    ax.set_yticks(range(len(models)), [m.replace("_", " ") for m in models])
    ax.set_xlabel("validation images of")
    ax.set_ylabel("model")
    ax.set_title(f"cross-site {metric} (95% intervals by patient)")
    figure.colorbar(image, ax=ax, fraction=0.04)
    return figure


def cross_site(
    cfg: Namespace, recipe: Recipe, splits: Splits, cohort: LocalCohort, run_dir: Path, logger
) -> list[dict]:
    """Train (or keep) the local models, then the matrix of them and the reported global
    model (best.ckpt, its threshold chosen) on every site."""
    paths = train_local_models(cfg, recipe, cohort, run_dir)
    columns = data_sets(splits)
    models = {}
    for site, path in paths.items():
        module = load_module(path)
        own = columns.get(f"site{site}")
        threshold = local_threshold(module, own, cfg.threshold, cfg.data.eval_batch_size)
        models[f"local_site{site}"] = load_module(path, threshold=threshold)
    models["global"] = load_module(best_checkpoint(run_dir))
    rows = cross_site_matrix(cfg, splits, models, run_dir)
    figure = matrix_figure(rows, list(models), list(columns))
    logger.experiment.add_figure("cross_site/accuracy", figure, 0)
    logger.experiment.flush()
    return rows
