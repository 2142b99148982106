"""One training job from a parsed config to a complete run directory, centralized or
federated alike:

    preflight -> load_splits -> (cohort) -> recipe -> run directory
      -> train_centralized | train_federated -> finalize -> summary.json

`python -m pneumonia.fit`, a comparison's entries and Flower's ServerApp all run jobs here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import lightning as L
import yaml
from jsonargparse import Namespace

from pneumonia.core.caches import default_cache_dir
from pneumonia.core.errors import UserError, continue_with
from pneumonia.core.files import check_writable_folder, write_json, write_text_atomic
from pneumonia.core.interrupt import interrupted
from pneumonia.core.ranks import is_primary
from pneumonia.core.safeload import safe_load
from pneumonia.core.startup import PACKAGE_LOGGER
from pneumonia.data.progressive import check_progressive
from pneumonia.data.sources import Splits, full_samples, load_splits
from pneumonia.data.tasks import task_classes
from pneumonia.data.transforms import check_augment
from pneumonia.federated.cohort import Cohort, LocalCohort
from pneumonia.federated.options import check_averaging, check_federated, simulates_sites
from pneumonia.inference.explain import lung_panel
from pneumonia.models.factory import (
    check_image_size,
    classifier_layer,
    count_parameters,
    create_model,
)
from pneumonia.models.transfer import freeze
from pneumonia.run.centralized import train_centralized
from pneumonia.run.config import (
    check_early_stopping,
    check_monitor,
    check_threshold,
    check_trainer,
    trainer_arguments,
)
from pneumonia.run.console import log_summary
from pneumonia.run.federated import train_federated
from pneumonia.run.finalize import finalize
from pneumonia.run.inputs import RunInputs, Trained
from pneumonia.run.progress import Progress
from pneumonia.run.rundir import (
    CONFIG,
    SPLIT,
    SUMMARY,
    check_experiment_name,
    check_resume_config,
    is_complete,
    keep_resume_config,
    last_checkpoint,
    locked,
    record_config,
    remove_temporary_files,
    resume_hint,
    round_state,
    run_directory,
    write_split_table,
)
from pneumonia.run.sites import cross_site, refuse_for_deployments, with_sites
from pneumonia.training.losses import check_loss
from pneumonia.training.privacy import (
    check_budget,
    check_privacy,
    check_private_model,
    probe_per_image_gradients,
)
from pneumonia.training.recipe import Recipe, make_recipe
from pneumonia.training.schedules import check_decay

# Supplies a federation's clients from elsewhere (Flower's SuperNodes), given the config and
# its resolved YAML; without one, the clients are simulated here (LocalCohort).
CohortFactory = Callable[[Namespace, str], Cohort]

log = logging.getLogger(__name__)


def preflight(cfg: Namespace) -> dict:
    """Check what can be checked without data (model, image size, threshold, federated
    settings) and return the model's parameter counts ("parameters"; with model.transfer,
    what it freezes: `FrozenLayers.describe`). Raises UserError."""
    check_experiment_name(cfg.experiment)
    check_writable_folder("run_dir" if cfg.run_dir else "runs_root", cfg.run_dir or cfg.runs_root)
    if cfg.data.root is not None:
        check_writable_folder("data.cache_dir", cfg.data.cache_dir or default_cache_dir())
    model = create_model(cfg.model, cfg.data.image_size, len(task_classes(cfg.data.task)))
    parameters: dict[str, object] = {"parameters": count_parameters(model)}
    if cfg.model.transfer != "finetune":
        head = getattr(*classifier_layer(model, len(task_classes(cfg.data.task))))
        parameters["transfer"] = {"mode": cfg.model.transfer} | freeze(
            model, cfg.model.transfer, head
        ).describe()
    check_task(cfg)
    check_threshold(cfg.threshold)
    check_trainer(cfg)
    check_monitor(cfg.monitor, cfg.data.shift.enabled)
    check_averaging(cfg.optim, cfg.federated)
    check_early_stopping(cfg)
    check_decay(cfg.optim.decay)
    check_loss(cfg.loss, cfg.model.drop_connect)
    check_augment(cfg.data.augment)
    check_progressive(cfg.data.progressive, cfg.data.image_size)
    if cfg.data.progressive.start_size:  # the model must take the first epochs' side too
        start = cfg.data.progressive.start_size
        check_image_size(model, cfg.model.name, start, "data.progressive.start_size")
    if cfg.federated.enabled:
        check_federated(cfg.federated)
    elif simulates_sites(cfg.federated):
        raise UserError(
            "federated.site_shift, sites_shift, hold_out, pooled and cross_site shape a "
            "federation's sites: set federated.enabled true (federated.pooled trains one "
            "client on the pooled sites: centralized training over them)"
        )
    check_privacy(cfg)
    if cfg.privacy.enabled:
        check_private_model(model, cfg.model.name)
        probe_per_image_gradients(model, cfg.model.name, cfg.data.image_size)
    return parameters


def check_task(cfg: Namespace) -> None:
    """Three classes train on the plain cross-entropy, with PNEUMONIA (any cause) positive."""
    if cfg.data.task != "three_class":
        return
    if cfg.loss.name != "cross_entropy":
        raise UserError(
            f"loss.name {cfg.loss.name} is a two-class loss: data.task three_class trains on "
            "cross_entropy (drop loss.name)"
        )
    if cfg.positive_class != "PNEUMONIA":
        raise UserError("data.task three_class: positive_class is PNEUMONIA (any cause)")


def describe_splits(splits: Splits) -> str:
    """A few lines on what the run trains on, naming synthetic data plainly."""
    lines = [f"data: {splits.source}"]
    for name in ("train", "val", "test"):
        part = getattr(splits, name)
        if part is not None:
            pairs = zip(part.classes, part.class_counts(), strict=True)
            counts = ", ".join(f"{c} {n}" for c, n in pairs)
            lines.append(
                f"  {name:5s} {len(part):5d} images, {len(set(part.patients)):5d} "
                f"patients ({counts})"
            )
    return "\n".join(lines)


def write_run_files(run_dir: Path, config_yaml: str, splits: Splits) -> None:
    """A new run directory's config.yaml and split.csv."""
    write_text_atomic(run_dir / CONFIG, config_yaml)
    record_config(run_dir, config_yaml)
    parts = {"train": splits.train, "val": splits.val, "test": splits.test}
    write_split_table(run_dir / SPLIT, parts | {"held_out": splits.held_out})


def saved_so_far(run_dir: Path, federated: bool) -> str:
    """What an interrupted run keeps, read from the files `--resume` reads."""
    # cast: a loaded file's contents (a round state or checkpoint: a dict that holds its step).
    if federated:
        state = round_state(run_dir)
        done = int(cast(dict, safe_load(state, mmap=True))["round"]) if state.is_file() else 0
        unit = "round"
    else:
        last = last_checkpoint(run_dir)
        done = int(cast(dict, safe_load(last, mmap=True))["epoch"]) + 1 if last.is_file() else 0
        unit = "epoch"
    if done == 0:
        return f"no {unit} was completed in {run_dir}"
    return (
        f"{unit} 1 is saved in {run_dir}"
        if done == 1
        else f"{unit}s 1-{done} are saved in {run_dir}"
    )


@contextlib.contextmanager
def stops_said(
    run_dir: Path, federated: bool, deployed: bool, unfinished: str = ""
) -> Iterator[None]:
    """Inside, an interruption or a failed write ends with what the run directory keeps and
    the command that continues it (`deployed`: a Flower deployment's). `unfinished`: the step
    that did not end, when the epochs or rounds are all saved."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit, OSError) as err:  # Lightning: Ctrl-C is exit(1)
        saved = saved_so_far(run_dir, federated)
        resumable = not saved.startswith("no ")
        hint = resume_hint(run_dir, resumable, deployed)
        if isinstance(err, OSError):  # a full disk, say: its line ends with the hint
            continue_with(err, hint)
            raise
        note = f" ({unfinished})" if unfinished and resumable else ""
        stopped = interrupted(err, saved + note, hint)
        if stopped is None:
            raise
        raise stopped from None


def remove_leftovers(run_dir: Path) -> None:
    removed = remove_temporary_files(run_dir)
    if removed:
        log.info(f"removed {removed} temporary file(s) an interrupted write left")


def finished_summary(run_dir: Path) -> dict:
    """A complete run's summary, left as it is: resuming it has nothing to do."""
    log.info(f"{run_dir} is complete: nothing to resume (its results: {run_dir / SUMMARY})")
    return json.loads((run_dir / SUMMARY).read_text())


def run_job(
    cfg: Namespace,
    config_yaml: str,
    resume: Path | None = None,
    progress: Progress | None = None,
    cohort: CohortFactory | None = None,
) -> dict:
    """Train, evaluate the reported model, write the run directory; return the summary.
    `resume`: a run directory to continue. `progress(done, total)` is called after every
    epoch or round. The run directory is locked while this process writes it. Raises
    UserError."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    started = time.time()
    # Clients from elsewhere: a Flower deployment's, or federated.engine simulation's, which
    # resumes as any fit run does.
    deployed = cohort is not None and cfg.federated.engine == "local"
    primary = is_primary()  # False in the copies of a central run on several devices
    if not primary:  # process 0 prints the run's lines
        logging.getLogger(PACKAGE_LOGGER).setLevel(logging.WARNING)
    with contextlib.ExitStack() as held:
        if resume and primary:  # locked before anything is read or removed: another process
            # may write it (the copies of this one only read it)
            then = resume_hint(resume, deployed=deployed)
            wait = f"wait for it to end (or stop it), then {then} if it did not"
            held.enter_context(locked(resume, wait))
        if resume:
            held.enter_context(stops_said(resume, cfg.federated.enabled, deployed))  # kept
            # an edited config.yaml is named as such, not by what its values break
            changes = check_resume_config(resume, config_yaml)
            for change in changes:
                log.info(f"resuming with {change} (safe to change)")
            if is_complete(resume, changes):
                if primary:
                    remove_leftovers(resume)
                return finished_summary(resume)
        # A bad model, size or federated setting fails now, not after minutes of decoding.
        parameters = preflight(cfg)
        if resume and primary:
            remove_leftovers(resume)
        splits, clients, recipe = prepare_inputs(cfg, config_yaml, cohort)
        run_dir = resume or held.enter_context(run_directory(cfg))
        run = RunInputs(cfg, recipe, splits, run_dir, progress, bool(resume), deployed)
        with stops_said(run_dir, cfg.federated.enabled, deployed):
            trained = train(run, config_yaml, clients)
        if not primary:  # process 0 scores the model and writes everything
            return {"run_dir": str(run_dir)}
        unfinished = "the final scoring did not finish"
        with stops_said(run_dir, cfg.federated.enabled, deployed, unfinished):
            results = report(run, config_yaml, trained, clients)
            summary = {
                "data": splits.source,
                "synthetic": cfg.data.root is None,
                "model": cfg.model.name,
                "norm": cfg.model.norm,
                **parameters,
                "image_size": cfg.data.image_size,
                **results,
                "wall_time_s": round(time.time() - started, 1),
                "run_dir": str(run_dir),
            }
            write_json(run_dir / SUMMARY, summary)
            if resume:  # the checkpoints are now trained under it (more epochs, say)
                record_config(run_dir, config_yaml)
    log_summary(summary, f"best_{trained.unit}", run_dir / SUMMARY)
    return summary


def prepare_inputs(
    cfg: Namespace, config_yaml: str, cohort: CohortFactory | None
) -> tuple[Splits, Cohort | None, Recipe]:
    """The splits, the clients of a federated run and the recipe, before any run directory
    exists: data, partition and node errors surface here."""
    federated = cfg.federated.enabled
    if cohort is not None and not federated:
        raise UserError("a deployment across hospitals is federated: set federated.enabled true")
    if federated and cfg.federated.engine != "local" and cohort is None:
        raise UserError(
            "federated.engine simulation runs from python -m pneumonia.fit (and pneumonia.train)"
            ": set federated.engine local for this job"
        )
    if federated and cfg.federated.secure_aggregation and cohort is None:
        raise UserError(
            "federated.secure_aggregation runs over the Flower deployment (python -m "
            "pneumonia.flower.demo, or flwr run): simulated clients share one process"
        )
    splits = load_splits(cfg.data, cfg.seed, sites=federated and cfg.federated.partition == "sites")
    log.info(describe_splits(splits))
    clients = None
    if federated:
        if cohort is not None and (why := refuse_for_deployments(cfg)):
            raise UserError(why)
        clients = (
            cohort(cfg, config_yaml) if cohort else LocalCohort(cfg, splits, trainer_arguments(cfg))
        )
        splits = with_sites(splits, cfg, clients)
        recipe = make_recipe(cfg, splits.train.classes, clients.moments())
        sizes = {f"client {row['client']}": row["images"] for row in clients.table}
    else:
        # Nothing re-images a central run's images: let data.intensity's originals go.
        splits = dataclasses.replace(splits, raw_train=None, raw_val=None)
        recipe = make_recipe(cfg, splits.train.classes, [splits.train.pixel_moments()])
        sizes = {"the training split": len(splits.train)}
    if cfg.privacy.enabled:
        check_budget(cfg, sizes)
    return splits, clients, recipe


def train(run: RunInputs, config_yaml: str, clients: Cohort | None) -> Trained:
    """A new run's first files, then the epochs or rounds (those not saved yet on resume)."""
    if not is_primary():  # a copy of a central run on several devices writes nothing
        return train_centralized(run)
    if not run.resume:
        write_run_files(run.run_dir, config_yaml, run.splits)
    else:  # more rounds or epochs from the command line: a later plain resume keeps them
        keep_resume_config(run.run_dir, config_yaml)
    log.info(f"run: {run.run_dir}  (tensorboard --logdir {run.run_dir.parent})")
    return train_federated(run, clients) if clients is not None else train_centralized(run)


def report(run: RunInputs, config_yaml: str, trained: Trained, clients: Cohort | None) -> dict:
    """Score the reported model (`finalize`), and what a run asks for beyond it."""
    cfg, splits, run_dir = run.cfg, run.splits, run.run_dir
    config = yaml.safe_load(config_yaml)
    results = finalize(trained, splits, cfg.data.eval_batch_size, cfg.threshold, run_dir, config)
    if clients is not None and cfg.federated.cross_site:
        # A deployment's cohort was refused before training (refuse_for_deployments).
        assert isinstance(clients, LocalCohort)
        results["cross_site"] = cross_site(
            cfg, run.recipe, splits, clients, run_dir, trained.logger
        )
    if cfg.data.roi == "lungs":  # the masks the crops came from, for a reader to judge
        figure = lung_panel(full_samples(cfg.data, cfg.seed))
        trained.logger.experiment.add_figure("data/lung_masks", figure, 0)
        trained.logger.experiment.flush()
    return results
