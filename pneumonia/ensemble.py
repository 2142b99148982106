"""`python -m pneumonia.ensemble --members CKPT... --out FILE`: trained models as one checkpoint.

The members are combined by stacking (default) or soft voting:

    python -m pneumonia.ensemble --members runs/a/version_0/checkpoints/best.ckpt \\
        runs/b/version_0/checkpoints/best.ckpt --out ensemble.ckpt [--rule soft_vote]

Each member is a run's checkpoints/best.ckpt; its validation predictions come from the run's
predictions.csv (two folders up). The members must share their validation images (the same
data and seed): the images none of them trained on. Stacking fits a logistic regression
(scikit-learn, L2 penalty, C = 1) on the members' logits logit(P(pneumonia)) of those images;
the checkpoint holds the one fitted on all of them. To score it honestly the images are also
cross-fitted, `--folds` folds by patient (stratified by class, shuffled by `--seed`): each
image's stacked probability comes from a regression fitted on the other folds' patients.
Printed, and written beside the checkpoint as <out stem>.json: accuracy, recall, specificity,
AUROC and log loss at threshold 0.5, with 95% bootstrap intervals over patients, of the
stack (out of fold), the soft vote and each member on the same images; on val_shift (the
validation patients under acquisition shifts) out of fold too, and for the regression fitted
on all validation images (optimistic: it has seen those patients unshifted); on test, when
the runs had one, with the regression fitted on all validation images. The checkpoint loads
wherever a best.ckpt does (evaluate, predict, serve, export); Grad-CAM refuses it
(`pneumonia.models.ensemble_model`).
Exit code 2 on bad input, with nothing written; 1 when a file cannot be written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from jsonargparse import ArgumentParser

from pneumonia.core.bounds import PositiveInt, Seed
from pneumonia.core.errors import exit_on_user_error
from pneumonia.models.ensemble_model import RULES
from pneumonia.run.config import parse_args, tool_parser


def build_parser() -> ArgumentParser:
    parser = tool_parser("python -m pneumonia.ensemble", __doc__)
    parser.add_argument(
        "--members", type=str, nargs="+", required=True, help="runs' checkpoints/best.ckpt"
    )
    parser.add_argument("--out", type=str, required=True, help="the checkpoint to write")
    parser.add_argument(
        "--rule",
        type=Literal[RULES],
        default="stacking",
        help="stacking: a logistic regression on the members' logits; soft_vote: their mean",
    )
    parser.add_argument("--folds", type=PositiveInt, default=5, help="cross-fitting folds")
    parser.add_argument("--seed", type=Seed, default=0, help="of the folds and the intervals")
    return parser


def print_table(report: dict) -> None:
    from pneumonia.run.stacking import REPORTED, THRESHOLD

    for split in ("val", "val_shift", "test"):
        if split not in report:
            continue
        entry = report[split]
        print(f"\n{split}: {entry['images']} images, {entry['patients']} patients. {entry['note']}")
        print(f"{'':24}" + "".join(f"{k:>20}" for k in REPORTED))
        for name, values in entry["methods"].items():
            cells = [
                f"{values[k]:.3f} ({values['ci95'][k][0]:.2f}-{values['ci95'][k][1]:.2f})"
                for k in REPORTED
            ]
            print(f"{name:24}" + "".join(f"{c:>20}" for c in cells))
    print(f"\nthreshold {THRESHOLD}; intervals: 95% bootstrap over patients", flush=True)


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    """Fit, report, write; return the report (for tests)."""
    args = parse_args(build_parser(), argv)
    from pneumonia.run.stacking import build_ensemble  # scikit-learn, Lightning: not for --help

    out = Path(args.out)
    report = build_ensemble(args.members, out, rule=args.rule, folds=args.folds, seed=args.seed)
    print_table(report)
    print(
        f"wrote {out} ({args.rule} of {len(args.members)} members) and {out.with_suffix('.json')}",
        flush=True,
    )
    return report


if __name__ == "__main__":
    main()
