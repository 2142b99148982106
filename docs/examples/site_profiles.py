"""One radiograph as each simulated site images it (federated.site_shift): what the profiles do.

    python docs/examples/site_profiles.py --root ../shared/data/chest_xray/train \\
        --sites 5 --out docs/results/sites/profiles.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pneumonia.data.decode import square  # noqa: E402
from pneumonia.data.sites import apply_profile, site_profiles  # noqa: E402
from pneumonia.data.sources import DataConfig, full_samples  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="a Kermany train folder (default: synthetic)")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--size", type=int, default=128, help="image side, as a run would use")
    parser.add_argument("--site_seed", type=int, default=2022, help="federated.site_seed")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    image = square(
        full_samples(DataConfig(root=args.root, image_size=args.size), 0, 1)[0], args.size
    )
    profiles = site_profiles(args.sites, args.site_seed)
    figure, axes = plt.subplots(1, args.sites + 1, figsize=(2.6 * (args.sites + 1), 3.1))
    axes[0].imshow(image[0], cmap="gray", vmin=0, vmax=255)
    axes[0].set_title("as decoded", fontsize=8)
    for j, (ax, p) in enumerate(zip(axes[1:], profiles, strict=True)):
        ax.imshow(apply_profile(image[None], p, seed=j)[0, 0], cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"site {j}\n" + p.describe().replace(", ", chr(10)), fontsize=7)
    for ax in axes:
        ax.axis("off")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110, bbox_inches="tight")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
