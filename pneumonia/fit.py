"""`python -m pneumonia.fit`: train one classifier, centrally or federated, into a complete
run directory.

    python -m pneumonia.fit                                   # synthetic data, CPU-sized
    python -m pneumonia.fit --config configs/fl_se_resnet_gn_cpu.yaml \\
        --data.root ../shared/data/chest_xray/train
    python -m pneumonia.fit --resume runs/fl_se_resnet_gn_cpu/version_0
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import yaml
from jsonargparse import Namespace

from pneumonia.centralized import Progress, train_centralized
from pneumonia.config import (
    build_fit_parser,
    check_monitor,
    check_threshold,
    parse_args,
    resume_dir,
    to_yaml,
    trainer_arguments,
    with_default_config,
)
from pneumonia.data.sources import Splits, load_splits
from pneumonia.data.transforms import check_augment
from pneumonia.errors import UserError, exit_on_user_error
from pneumonia.federated.cohort import Cohort
from pneumonia.federated.config import check_averaging, check_federated
from pneumonia.federated.loop import FederatedRun, run_federated
from pneumonia.models.registry import count_parameters, create_model
from pneumonia.rundir import new_run_dir, write_json, write_split_table, write_text_atomic
from pneumonia.summary import best_checkpoint_metrics, print_summary

# Lightning advice that does not apply here: the run directory holds config.yaml before the
# loggers start, and in-memory tensors need no loader workers.
warnings.filterwarnings("ignore", message=r".*exists and is not empty.*")
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


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


def parse_config(argv: list[str]) -> tuple[Namespace, Namespace, str, Path | None]:
    """(instantiated config, raw config, its YAML, the run dir to resume or None)."""
    parser = build_fit_parser()
    resume = resume_dir(argv)
    if resume is not None:
        argv = ["--config", str(resume / "config.yaml")]
    raw = parse_args(parser, with_default_config(argv))
    # Groups become their dataclasses; trainer.* stays a namespace.
    return parser.instantiate(raw), raw, to_yaml(parser, raw), resume


def prepare_run_dir(cfg: Namespace, config_yaml: str, splits: Splits) -> Path:
    """runs/<experiment>/version_N with config.yaml and split.csv."""
    run_dir = new_run_dir(cfg.runs_root, cfg.experiment, cfg.run_dir)
    write_text_atomic(run_dir / "config.yaml", config_yaml)
    write_split_table(
        run_dir / "split.csv", {"train": splits.train, "val": splits.val, "test": splits.test}
    )
    return run_dir


def train_federated(
    run: FederatedRun,
    cfg: Namespace,
    splits: Splits,
    run_dir: Path,
    resume: bool,
    config: dict,
    progress: Progress | None = None,
):
    """The federated rounds, then the best round's metrics; the summary's training part."""
    tensorboard = run_federated(run, run_dir, resume, progress)
    fed = cfg.federated
    best, results = best_checkpoint_metrics(
        run.module,
        run_dir / "checkpoints" / "best.ckpt",
        splits,
        tensorboard.experiment,
        cfg.data.eval_batch_size,
        cfg.threshold,
        run_dir / "predictions.csv",
    )
    key = cfg.monitor.replace("/", "_")
    tensorboard.log_hyperparams(config, {f"hparams/best_{key}": run.best[1]})
    return {
        "federated": {
            "strategy": fed.strategy,
            "partition": fed.partition,
            "clients": len(run.cohort),
            "rounds": len(run.history),
            "local_epochs": fed.local_epochs,
            "partition_table": run.table,
        },
        "best_round": int(best["round"]),
        "selected_by": run.selection_rule(),
        **results,
    }


def preflight(cfg: Namespace) -> int:
    """Check what can be checked without data (model, image size, threshold, federated
    settings) and return the model's parameter count. Raises UserError."""
    parameters = count_parameters(create_model(cfg.model, cfg.data.image_size))
    check_threshold(cfg.threshold)
    check_monitor(cfg.monitor, cfg.data.shift.enabled)
    check_averaging(cfg.optim, cfg.federated)
    check_augment(cfg.data.augment)
    if cfg.federated.enabled:
        check_federated(cfg.federated)
    return parameters


def run(
    argv: list[str] | None = None,
    progress: Progress | None = None,
    cohort: Callable[[Namespace, str], Cohort] | None = None,
) -> dict:
    """Parse the config, train, evaluate the best checkpoint, write the run directory.
    `progress(done, total)` is called after every epoch (centralized) or round (federated).
    `cohort(cfg, config_yaml)` supplies federated clients from elsewhere (Flower's
    SuperNodes) instead of simulating them here.
    Raises UserError; `main` is the command line's version, which prints it as one line."""
    cfg, raw, config_yaml, resume = parse_config(sys.argv[1:] if argv is None else argv)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    started = time.time()
    # A bad model, size or federated setting fails now, not after minutes of decoding images.
    parameters = preflight(cfg)
    federated = cfg.federated.enabled
    sites = federated and cfg.federated.partition == "sites"
    splits = load_splits(cfg.data, cfg.seed, sites=sites)
    print(describe_splits(splits), flush=True)
    args = trainer_arguments(cfg)
    if cohort is not None and not federated:
        raise UserError("a deployment across hospitals is federated: set federated.enabled true")
    clients = cohort(cfg, config_yaml) if cohort is not None else None
    # Partition and node errors surface here.
    run = FederatedRun(cfg, splits, args, clients) if federated else None
    # Created only now: a config or data error above leaves no half-made run behind.
    run_dir = resume or prepare_run_dir(cfg, config_yaml, splits)
    print(f"run: {run_dir}  (tensorboard --logdir {run_dir.parent})", flush=True)
    if federated:
        config = yaml.safe_load(config_yaml)
        trained = train_federated(run, cfg, splits, run_dir, bool(resume), config, progress)
    else:
        trained = train_centralized(cfg, splits, run_dir, args, bool(resume), progress)
    summary = {
        "data": splits.source,
        "synthetic": cfg.data.root is None,
        "model": cfg.model.name,
        "norm": cfg.model.norm,
        "parameters": parameters,
        "image_size": cfg.data.image_size,
        **trained,
        "wall_time_s": round(time.time() - started, 1),
        "run_dir": str(run_dir),
    }
    write_json(run_dir / "summary.json", summary)
    print_summary(summary, "best_round" if federated else "best_epoch", run_dir / "summary.json")
    return summary


main = exit_on_user_error(run)


if __name__ == "__main__":
    main()
