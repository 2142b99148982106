"""`python -m pneumonia.fit`: train one classifier and leave a complete run directory.

    python -m pneumonia.fit                                   # synthetic data, CPU-sized
    python -m pneumonia.fit --config configs/centralized_se_resnet_gn_cpu.yaml \\
        --data.root ../shared/data/chest_xray/train
"""

from __future__ import annotations

import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from pneumonia.config import build_fit_parser, parse_args, to_yaml, with_default_config
from pneumonia.data.datamodule import ChestXrayDataModule, class_balanced_weights
from pneumonia.data.sources import Splits, load_splits
from pneumonia.errors import exit_on_user_error
from pneumonia.evaluation import evaluate_imageset
from pneumonia.metrics import SCALARS
from pneumonia.models.registry import count_parameters, create_model
from pneumonia.module import ClassifierModule
from pneumonia.rundir import new_run_dir, write_json, write_split_table, write_text_atomic
from pneumonia.safeload import safe_load

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


def build_module(cfg: Namespace, splits: Splits) -> ClassifierModule:
    """The LightningModule the config describes, normalised with the training images' stats."""
    mean, std = splits.train.pixel_mean_std()
    weights = (
        class_balanced_weights(splits.train.labels, len(splits.train.classes))
        if cfg.data.balance == "loss_weights"
        else None
    )
    return ClassifierModule(
        model=asdict(cfg.model),
        optim=asdict(cfg.optim),
        image_size=cfg.data.image_size,
        classes=splits.train.classes,
        positive_class=cfg.positive_class,
        class_weights=weights,
        mean=round(mean, 4),
        std=round(std, 4),
    )


def build_datamodule(cfg: Namespace, splits: Splits) -> ChestXrayDataModule:
    d = cfg.data
    return ChestXrayDataModule(
        splits.train,
        splits.val,
        splits.test,
        batch_size=d.batch_size,
        eval_batch_size=d.eval_batch_size,
        balanced_sampling=d.balance == "sampler",
        augment=d.augment,
        seed=cfg.seed,
        num_workers=d.num_workers,
    )


def trainer_arguments(cfg: Namespace) -> dict:
    """The user's trainer.* options, with mixed precision by default on CUDA only."""
    args = dict(cfg.trainer)
    on_cuda = torch.cuda.is_available() and args.get("accelerator") in ("auto", "gpu", "cuda")
    if args.get("precision") is None:
        if on_cuda:
            args["precision"] = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
        else:
            args["precision"] = "32-true"
    return args


def build_trainer(cfg: Namespace, run_dir: Path) -> tuple[L.Trainer, ModelCheckpoint]:
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor=cfg.monitor,
        mode="min" if cfg.monitor.endswith("loss") else "max",
        save_last=True,
        auto_insert_metric_name=False,
    )
    loggers = [
        TensorBoardLogger(run_dir, name="", version="", default_hp_metric=False),
        CSVLogger(run_dir, name="", version=""),
    ]
    trainer = L.Trainer(
        **trainer_arguments(cfg), logger=loggers, callbacks=[checkpoint], default_root_dir=run_dir
    )
    return trainer, checkpoint


def final_metrics(
    module: ClassifierModule,
    checkpoint: ModelCheckpoint,
    splits: Splits,
    trainer: L.Trainer,
    batch_size: int,
) -> dict:
    """Validation (and test) metrics of the best checkpoint, also sent to TensorBoard."""
    best = safe_load(checkpoint.best_model_path or checkpoint.last_model_path)
    module.load_state_dict(best["state_dict"])
    tensorboard = trainer.loggers[0].experiment
    results = {"best_epoch": int(best["epoch"])}
    for name in ("val", "test"):
        imageset = getattr(splits, name)
        if imageset is None:
            continue
        values, metrics = evaluate_imageset(module, imageset, batch_size)
        results[name] = values
        for key, value in values.items():
            if isinstance(value, float):
                tensorboard.add_scalar(f"best/{name}/{key}", value, 0)
        for fig_name, figure in metrics.figures(module.negative_and_positive).items():
            tensorboard.add_figure(f"best/{name}/{fig_name}", figure, 0)
    tensorboard.flush()
    return results


def format_metrics(values: dict) -> str:
    """One line of the scalar metrics."""
    return "  ".join(f"{k} {values[k]:.3f}" for k in SCALARS) + f"  (n={values['n']})"


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    """Parse the config, train, evaluate the best checkpoint, write the run directory."""
    parser = build_fit_parser()
    argv = with_default_config(sys.argv[1:] if argv is None else argv)
    raw = parse_args(parser, argv)
    cfg = parser.instantiate(raw)  # groups become their dataclasses; trainer.* stays a namespace
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    started = time.time()
    # A bad model name or size fails now, not after minutes of decoding images.
    create_model(cfg.model, cfg.data.image_size)
    splits = load_splits(cfg.data, cfg.seed)
    print(describe_splits(splits), flush=True)
    module = build_module(cfg, splits)
    datamodule = build_datamodule(cfg, splits)
    # Created only now: a config or data error above leaves no half-made run behind.
    run_dir = new_run_dir(cfg.runs_root, cfg.experiment, cfg.run_dir)
    write_text_atomic(run_dir / "config.yaml", to_yaml(parser, raw))
    parts = {"train": splits.train, "val": splits.val, "test": splits.test}
    write_split_table(run_dir / "split.csv", parts)
    print(f"run: {run_dir}  (tensorboard --logdir {run_dir.parent})", flush=True)
    trainer, checkpoint = build_trainer(cfg, run_dir)
    trainer.fit(module, datamodule)
    summary = {
        "data": splits.source,
        "synthetic": cfg.data.root is None,
        "model": cfg.model.name,
        "norm": cfg.model.norm,
        "parameters": count_parameters(module.model),
        "image_size": cfg.data.image_size,
        "epochs": trainer.current_epoch,
        **final_metrics(module, checkpoint, splits, trainer, cfg.data.eval_batch_size),
        "wall_time_s": round(time.time() - started, 1),
        "run_dir": str(run_dir),
    }
    write_json(run_dir / "summary.json", summary)
    for name in ("val", "test"):
        if name in summary:
            print(f"{name} (best epoch {summary['best_epoch']}): {format_metrics(summary[name])}")
    print(f"summary: {run_dir / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main()
