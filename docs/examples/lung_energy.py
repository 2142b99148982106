"""How much of each model's Grad-CAM lies inside the lung field, on the same validation images.

CXR-FL (Slazyk et al. 2022) found that a classifier trained on the lung region alone may look
at the right place more often. This measures it for our runs: for every validation image of
the first run (its split.csv) whose lung field is plausible (pneumonia.data.lungs), each run's
model makes its Grad-CAM, in the full image's frame (a lung-field model's map sits in its crop
box, zero outside it), and the share of the map's energy inside the lung mask is averaged, with
a 95% bootstrap interval resampled by patient. Beside it, `uniform`: the share a map spread
evenly over what the model saw would have (the mask's share of the image, or of the crop box),
the figure to beat before a model can be said to look at the lungs.

    python docs/examples/lung_energy.py --root ../shared/data/chest_xray/train \\
        --out docs/results/lungs runs/compare/lungs_cpu/*/
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pneumonia.training.checkpoint import load_module  # noqa: E402
from pneumonia.data.decode import read_image  # noqa: E402
from pneumonia.data.kermany import find_splits, list_image_files  # noqa: E402
from pneumonia.data.lungs import lung_box, lung_field, pixel_box  # noqa: E402
from pneumonia.core.errors import UserError, exit_on_user_error  # noqa: E402
from pneumonia.inference.explain import lung_energy_share  # noqa: E402


def validation_files(run_dir: Path, root: str, count: int) -> list[tuple[Path, str]]:
    """(file, patient) of the run's validation images with a plausible lung field, in
    split.csv order, at most `count`."""
    with open(run_dir / "split.csv", newline="") as f:
        val = [(r["name"], r["patient"]) for r in csv.DictReader(f) if r["split"] == "val"]
    path_of = {f.path.name: f.path for f in list_image_files(find_splits(root)["train"])}
    out = []
    for name, patient in val:
        if name in path_of and lung_field(read_image(path_of[name])).plausible:
            out.append((path_of[name], patient))
        if len(out) == count:
            break
    if not out:
        raise UserError(f"{run_dir}/split.csv: no validation image of it found under {root}")
    return out


def box(mask: np.ndarray) -> tuple[slice, slice]:
    """The crop box of a mask at its own resolution, as slices."""
    r0, r1, c0, c1 = pixel_box(lung_box(mask), *mask.shape)
    return slice(r0, r1), slice(c0, c1)


def interval(values: torch.Tensor, patients: list[str], seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap of the mean, resampling patients."""
    names = sorted(set(patients))
    index = {p: i for i, p in enumerate(names)}
    of = torch.tensor([index[p] for p in patients])
    g = torch.Generator().manual_seed(seed)
    means = []
    for _ in range(1000):
        counts = torch.bincount(torch.randint(len(names), (len(names),), generator=g),
                                minlength=len(names)).double()  # fmt: skip
        w = counts[of]
        means.append(float((w * values).sum() / w.sum()))
    means = torch.tensor(means)
    return float(means.quantile(0.025)), float(means.quantile(0.975))


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (best.ckpt)")
    parser.add_argument("--root", required=True, help="the Kermany train folder they used")
    parser.add_argument("--count", type=int, default=300, help="validation images at most")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    files = validation_files(args.runs[0], args.root, args.count)
    fulls = [read_image(path) for path, _ in files]
    patients = [p for _, p in files]
    rows = []
    masks = [lung_field(full).mask for full in fulls]
    uniform = {
        "full": float(np.mean([m.mean() for m in masks])),
        "lungs": float(np.mean([m[box(m)].mean() for m in masks])),
    }
    for run in args.runs:
        module = load_module(run / "checkpoints" / "best.ckpt")
        roi = module.hparams.get("roi", "full")
        shares = torch.tensor([lung_energy_share(module, full, roi) for full in fulls])
        ok = ~torch.isnan(shares)
        kept = [p for p, k in zip(patients, ok.tolist(), strict=True) if k]
        low, high = interval(shares[ok].double(), kept)
        rows.append({"run": run.name, "roi": roi, "images": int(ok.sum()),
                     "energy_in_lungs": round(float(shares[ok].mean()), 4),
                     "low": round(low, 4), "high": round(high, 4),
                     "uniform": round(uniform[roi], 4)})  # fmt: skip
        print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "lung_energy.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out / 'lung_energy.csv'} ({len(files)} validation images with lungs)")


if __name__ == "__main__":
    main()
