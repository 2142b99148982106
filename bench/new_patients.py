"""The options that aim at new patients, one at a time from the federated CPU config.

Each variant changes one thing from `configs/fl_se_resnet_gn_cpu.yaml` (SE-ResNet-18-GN,
FedAvg over 3 IID clients, 64 px) and is scored on clean and shift validation and on the
validation's subgroups (file-name families: `pneumonia.data.groups`), with 95% intervals
by patient. A screening protocol, so that every variant fits beside the others on 2 cores:
half the training patients (data.train_fraction 0.5; the validation patients are those of
the full config) and 6 rounds x 2 local epochs, the mean of the last 2 rounds' models
(12 passes over half the images, against 36 over all of them in the config).

    python bench/new_patients.py --root ../shared/data/chest_xray/train       # every variant
    python bench/new_patients.py --root DIR --only base,clahe,size_128         # some of them

Each variant is a `python -m pneumonia.fit` run in runs/new_patients/<variant>/ (skipped when
its summary.json exists). `ensemble3` is no run: the mean probability of base, seed1 and
seed2 (three federations that differ only in seed, on the same validation patients: a deep
ensemble), scored like a run. The table goes to reports/new_patients/ablation.md and .csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import common  # noqa: F401  (puts the repository on sys.path)
import torch

from pneumonia.data.groups import family_groups
from pneumonia.metrics.classification import DiagnosisMetrics
from pneumonia.metrics.intervals import bootstrap_intervals

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "fl_se_resnet_gn_cpu.yaml"
SCREEN = [
    "--data.train_fraction", "0.5", "--federated.rounds", "6",
    "--federated.local_epochs", "2", "--federated.average_rounds", "2",
]  # fmt: skip
BF16 = ["--trainer.precision", "bf16-mixed"]
# The base run's validation patients for every seed: the ensemble's members must be scored
# on the same images (a seed also draws the split).
SAME_SPLIT = ["--data.split_from", "{runs}/base/split.csv"]
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "base": ("the config (screening protocol)", []),
    "bf16": ("bf16 autocast (trainer.precision bf16-mixed)", BF16),
    "equalize": ("histogram equalisation of every image (data.intensity equalize)", ["--data.intensity", "equalize"]),  # noqa: E501
    "clahe": ("CLAHE of every image (data.intensity clahe)", ["--data.intensity", "clahe"]),
    "randconv": ("random convolutions, p 0.5 (data.augment.randconv 0.5)", ["--data.augment.randconv", "0.5"]),  # noqa: E501
    "mixstyle": ("MixStyle after stages 1-2, p 0.5 (model.mixstyle 0.5)", ["--model.mixstyle", "0.5"]),  # noqa: E501
    "size_96": ("96 px, bf16", ["--data.image_size", "96", *BF16]),
    "size_128": ("128 px, bf16, progressive from 64 px", ["--data.image_size", "128", "--data.progressive.start_size", "64", *BF16]),  # noqa: E501
    "seed1": ("seed 1 on base's validation patients", ["--seed", "1", *SAME_SPLIT]),
    "seed2": ("seed 2 on base's validation patients", ["--seed", "2", *SAME_SPLIT]),
    "ensemble3": ("mean probability of base, seed1, seed2 (no run: 3x the cost)", []),
}  # fmt: skip
MEMBERS = ("base", "seed1", "seed2")


def run_variant(name: str, root: str, runs: Path) -> Path:
    run_dir = runs / name
    if not (run_dir / "summary.json").is_file():
        extra = [a.format(runs=runs) for a in VARIANTS[name][1]]
        argv = ["--config", str(CONFIG), "--data.root", root, "--run_dir", str(run_dir)]
        argv += ["--trainer.enable_progress_bar", "false", "--experiment", f"np_{name}"]
        subprocess.run([sys.executable, "-m", "pneumonia.fit", *argv, *SCREEN, *extra], check=True)
    return run_dir


def predictions(run_dir: Path) -> dict[str, dict[str, tuple[str, int, float]]]:
    """split -> image name -> (patient, positive, probability), from predictions.csv."""
    out: dict[str, dict] = {}
    with open(run_dir / "predictions.csv", newline="") as f:
        for row in csv.DictReader(f):
            out.setdefault(row["split"], {})[row["image"]] = (
                row["patient"],
                int(row["positive"]),
                float(row["probability"]),
            )
    return out


def figures(rows: list[tuple[str, int, float]], threshold: float = 0.5) -> dict:
    """Accuracy, specificity, recall and AUROC with 95% intervals by patient."""
    patients = [r[0] for r in rows]
    targets = torch.tensor([r[1] for r in rows], dtype=torch.bool)
    probs = torch.tensor([r[2] for r in rows])
    metrics = DiagnosisMetrics(threshold)
    metrics.update(probs, targets)
    values = metrics.compute()
    values["ci95"] = bootstrap_intervals(probs, targets, threshold, patients)
    return values


def scored(preds: dict[str, dict]) -> dict:
    """Clean and shift figures, and each validation subgroup's accuracy."""
    out = {split: figures(list(preds[split].values())) for split in ("val", "val_shift")}
    names = list(preds["val"])
    groups = family_groups(names)
    out["groups"] = {
        family: figures([preds["val"][names[i]] for i in index]) for family, index in groups.items()
    }
    return out


def ensemble(runs: Path) -> dict:
    """The members' mean probability on each image (the images they all scored)."""
    members = [predictions(runs / m) for m in MEMBERS]
    out = {}
    for split in ("val", "val_shift"):
        names = [n for n in members[0][split] if all(n in m[split] for m in members)]
        out[split] = {
            n: (
                members[0][split][n][0],
                members[0][split][n][1],
                sum(m[split][n][2] for m in members) / len(members),
            )
            for n in names
        }
    return out


def cell(values: dict, key: str) -> str:
    low, high = values["ci95"][key]
    return f"{values[key]:.3f} [{low:.3f}, {high:.3f}]"


COLUMNS = ("accuracy", "specificity", "recall", "auroc")
# Kermany's file-name families (pneumonia.data.groups): two series of normals, whose accuracy
# is their specificity, and the two causes of pneumonia, whose accuracy is their recall.
FAMILIES = ("IM", "NORMAL-IM", "person-bacteria", "person-virus")


def row(name: str, result: dict, minutes: float, per_round: float) -> tuple[str, dict]:
    worst_name, worst = min(result["groups"].items(), key=lambda item: item[1]["accuracy"])
    cells = [cell(result[s], c) for s in ("val", "val_shift") for c in COLUMNS]
    groups = result["groups"]
    cells += [cell(groups[g], "accuracy") if g in groups else "-" for g in FAMILIES]
    cells += [f"{worst_name} {cell(worst, 'accuracy')}"]
    cells += [f"{minutes:.1f}", f"{per_round:.0f}"]
    line = f"| {name} | {VARIANTS[name][0]} | " + " | ".join(cells) + " |"
    record = {"variant": name, "worst_group": worst_name, "wall_min": round(minutes, 2)}
    record["median_round_s"] = round(per_round, 1)
    for s in ("val", "val_shift"):
        for c in COLUMNS:
            record[f"{s}_{c}"] = round(result[s][c], 4)
            record[f"{s}_{c}_low"], record[f"{s}_{c}_high"] = result[s]["ci95"][c]
    record["worst_accuracy"] = round(worst["accuracy"], 4)
    record["worst_low"], record["worst_high"] = worst["ci95"]["accuracy"]
    for family, values in result["groups"].items():
        record[f"group_{family}"] = round(values["accuracy"], 4)
    return line, record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="the Kermany train/ folder")
    parser.add_argument("--only", default="", help="comma-separated variants (default: all)")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "new_patients"))
    parser.add_argument("--out", default=str(ROOT / "reports" / "new_patients"))
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(VARIANTS)
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
    runs, out = Path(args.runs).resolve(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    head = ["variant", "change"] + [f"{s} {c}" for s in ("val", "shift") for c in COLUMNS]
    head += [f"val {family}" for family in FAMILIES] + ["worst val group acc", "min", "s/round"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    records = []
    for name in names:
        if name == "ensemble3":
            for member in MEMBERS:
                run_variant(member, args.root, runs)
            result = scored(ensemble(runs))
            minutes = sum(_minutes(runs / m) for m in MEMBERS)
            per_round = sum(_round_seconds(runs / m) for m in MEMBERS)
        else:
            run_dir = run_variant(name, args.root, runs)
            result, minutes = scored(predictions(run_dir)), _minutes(run_dir)
            per_round = _round_seconds(run_dir)
        line, record = row(name, result, minutes, per_round)
        lines.append(line)
        records.append(record)
        (out / "ablation.md").write_text("\n".join(lines) + "\n")
        fields = sorted({k for r in records for k in r}, key=lambda k: (k != "variant", k))
        with open(out / "ablation.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(records)
        print("\n".join(lines), flush=True)


def _minutes(run_dir: Path) -> float:
    return json.loads((run_dir / "summary.json").read_text())["wall_time_s"] / 60


def _round_seconds(run_dir: Path) -> float:
    """The median round's seconds (training and the round's validation): robust to a round
    slowed by another process on a shared machine, which the wall time is not."""
    with open(run_dir / "rounds.csv", newline="") as f:
        elapsed = [0.0] + [float(r["elapsed_s"]) for r in csv.DictReader(f)]
    return statistics.median(b - a for a, b in zip(elapsed, elapsed[1:], strict=False))


if __name__ == "__main__":
    main()
