"""The generalisation recipe, one piece at a time: each variant changes one thing from the old
centralized CPU config (bench/recipe_base.yaml: SE-ResNet-18-GN, 64 px, 8 epochs, the default
random affine, class-weighted loss, best epoch by val/accuracy) and is scored on clean and
shift validation, with 95% intervals by patient.

    python bench/recipe.py --root ../shared/data/chest_xray/train      # about 45 min here
    python bench/recipe.py --root DIR --only base,ema                   # some variants

Each variant is a `python -m pneumonia.fit` run in runs/recipe/<variant>/ (skipped when its
summary.json exists); `tta` re-scores the base run's checkpoint with test-time augmentation.
The table goes to reports/recipe/ablation.md and .csv, and is printed.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "bench" / "recipe_base.yaml"
INTENSITY = [
    "--data.augment.brightness", "0.1", "--data.augment.contrast", "0.2",
    "--data.augment.gamma", "0.25", "--data.augment.noise", "0.03",
    "--data.augment.blur", "0.01",
]  # fmt: skip
NO_AFFINE = [
    "--data.augment.rotation", "0", "--data.augment.translate", "0",
    "--data.augment.scale_min", "1", "--data.augment.scale_max", "1",
]  # fmt: skip
WIDE_AFFINE = [
    "--data.augment.rotation", "15", "--data.augment.translate", "0.1",
    "--data.augment.scale_min", "0.85", "--data.augment.scale_max", "1.15",
    "--data.augment.crop_area_min", "0.6",
]  # fmt: skip
SELECT = ["--monitor", "val_shift/loss"]
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "base": ("the old config", []),
    "no_augmentation": ("- the affine augmentation (data.augment.enabled false)", ["--data.augment.enabled", "false"]),  # noqa: E501
    "wide_affine_crop": ("wider affine and random-resized crop (area 0.6-1) instead of the affine", WIDE_AFFINE),  # noqa: E501
    "intensity": ("+ intensity augmentation (brightness, contrast, gamma, noise, blur)", INTENSITY),  # noqa: E501
    "intensity_no_affine": ("intensity augmentation instead of the affine", NO_AFFINE + INTENSITY),  # noqa: E501
    "label_smoothing": ("+ label smoothing 0.1", ["--optim.label_smoothing", "0.1"]),
    "balance_none": ("class balance: none instead of loss weights", ["--data.balance", "none"]),
    "balance_sampler": ("class balance: sampler instead of loss weights", ["--data.balance", "sampler"]),  # noqa: E501
    "ema": ("+ EMA of the weights (decay 0.995)", ["--optim.weight_averaging", "ema"]),
    "swa": ("+ SWA of epoch-end weights (second half)", ["--optim.weight_averaging", "swa"]),
    "monitor_shift_loss": ("best epoch by val_shift/loss", ["--monitor", "val_shift/loss"]),
    "tta": ("+ test-time augmentation (base model)", []),
    "size_96": ("96 px instead of 64", ["--data.image_size", "96"]),
    # The same pieces once more on top of the better selection rule: the old rule (clean
    # val/accuracy) picks an early, noisy epoch, which hides what a piece does by the end.
    "sel_intensity": ("best by val_shift/loss, + intensity augmentation", SELECT + INTENSITY),
    "sel_ema": ("best by val_shift/loss, + EMA of the weights", SELECT + ["--optim.weight_averaging", "ema"]),  # noqa: E501
    "sel_balance_none": ("best by val_shift/loss, class balance none", SELECT + ["--data.balance", "none"]),  # noqa: E501
    "sel_size_96": ("best by val_shift/loss, 96 px", SELECT + ["--data.image_size", "96"]),
}  # fmt: skip
COLUMNS = ("accuracy", "recall", "specificity", "auroc", "ece", "loss")


def run_variant(name: str, extra: list[str], root: str, runs: Path) -> dict:
    run_dir = runs / name
    if not (run_dir / "summary.json").is_file():
        argv = ["--config", str(BASE_CONFIG), "--data.root", root, "--run_dir", str(run_dir)]
        argv += [
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.enable_model_summary",
            "false",
        ]
        subprocess.run([sys.executable, "-m", "pneumonia.fit", *argv, *extra], check=True)
    return json.loads((run_dir / "summary.json").read_text())


def rescore(run_dir: Path, root: str, checkpoint: str = "best.ckpt", tta: bool = False) -> dict:
    """A run's checkpoint on its own validation patients (clean and shifted), with 95%
    intervals: e.g. with TTA, or a federated run's last round instead of its average."""
    from pneumonia.data.sources import load_splits
    from pneumonia.inference.scoring import predict_probabilities, score_with_intervals
    from pneumonia.run.config import parse_fit_config
    from pneumonia.training.checkpoint import load_module

    cfg = parse_fit_config(["--config", str(run_dir / "config.yaml"), "--data.root", root])[0]
    module = load_module(run_dir / "checkpoints" / checkpoint)
    splits = load_splits(cfg.data, cfg.seed)
    out = {}
    for name, images in splits.evaluation_sets().items():
        probs = predict_probabilities(module, images.images, 256, tta=tta)
        out[name] = score_with_intervals(module, probs, images)[0]
    return out | {"wall_time_s": float("nan")}


def cell(values: dict, key: str) -> str:
    low, high = values["ci95"][key]
    return f"{values[key]:.3f} [{low:.3f}, {high:.3f}]"


def table(rows: dict[str, dict]) -> tuple[str, list[dict]]:
    head = ["variant", "change"] + [f"{s} {c}" for s in ("val", "shift") for c in COLUMNS]
    lines = ["| " + " | ".join(head + ["min"]) + " |", "|" + " --- |" * (len(head) + 1)]
    records = []
    for name, summary in rows.items():
        cells = [cell(summary[s], c) for s in ("val", "val_shift") for c in COLUMNS]
        minutes = summary.get("wall_time_s", float("nan")) / 60
        lines.append(
            f"| {name} | {VARIANTS[name][0]} | " + " | ".join(cells) + f" | {minutes:.1f} |"
        )
        record = {"variant": name}
        for s in ("val", "val_shift"):
            for c in COLUMNS:
                record[f"{s}_{c}"] = summary[s][c]
                record[f"{s}_{c}_low"], record[f"{s}_{c}_high"] = summary[s]["ci95"][c]
        records.append(record | {"wall_time_s": summary.get("wall_time_s")})
    return "\n".join(lines), records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="the Kermany train/ folder")
    parser.add_argument("--only", default="", help="comma-separated variants (default: all)")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "recipe"))
    parser.add_argument("--out", default=str(ROOT / "reports" / "recipe"))
    parser.add_argument(
        "--rescore",
        metavar="RUN_DIR",
        help="instead: print one run's CHECKPOINT on clean and shift validation, as JSON",
    )
    parser.add_argument("--checkpoint", default="best.ckpt")
    parser.add_argument("--tta", action="store_true")
    args = parser.parse_args()
    if args.rescore:
        summary = rescore(Path(args.rescore), args.root, args.checkpoint, args.tta)
        print(json.dumps(summary))
        return
    names = [n for n in args.only.split(",") if n] or list(VARIANTS)
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
    runs, out = Path(args.runs), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}
    for name in names:
        if name == "tta":
            rows[name] = rescore(runs / "base", args.root, tta=True)
        else:
            rows[name] = run_variant(name, VARIANTS[name][1], args.root, runs)
        text, records = table(rows)
        (out / "ablation.md").write_text(text + "\n")
        with open(out / "ablation.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
        print(text, flush=True)


if __name__ == "__main__":
    main()
