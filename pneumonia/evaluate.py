"""`python -m pneumonia.evaluate --ckpt FILE --data.root DIR`: metrics of a checkpoint as JSON.

The checkpoint alone fixes the preprocessing (image size, one channel, normalisation), so any
folder with NORMAL/ and PNEUMONIA/ sub-folders (or a split layout, whose test/ is used) can be
evaluated. Every metric comes with a 95% bootstrap interval resampled by patient ("ci95");
`--threshold` scores at another operating point, `--tta true` averages small re-framings,
`--shift true` also scores the images under the shift validation's acquisition shifts.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from jsonargparse import ArgumentParser

from pneumonia.core.bounds import PositiveInt, Seed
from pneumonia.core.errors import UserError, exit_on_user_error
from pneumonia.run.config import (
    add_device_option,
    add_threshold_option,
    check_device,
    parse_args,
    threshold_override,
    tool_parser,
)

# The modules that score (torch, Lightning, torchmetrics) load in the functions that use them,
# so that --help and a usage error answer at once.


def build_parser() -> ArgumentParser:
    parser = tool_parser("python -m pneumonia.evaluate", __doc__)
    parser.add_argument("--ckpt", type=str, required=True, help="checkpoint from pneumonia.fit")
    parser.add_argument("--data.root", type=str, required=True, help="folder of class folders")
    parser.add_argument(
        "--data.split",
        type=str | None,
        default=None,
        help="the split folder to use in a train/val/test layout; null: test (train where "
        "there is none)",
    )
    parser.add_argument(
        "--data.skip_corrupt",
        type=bool,
        default=False,
        help="leave out images that cannot be decoded; false: stop at the first",
    )
    parser.add_argument(
        "--data.cache_dir",
        type=str | None,
        default=None,
        help="where decoded images are kept; null: $PNEUMONIA_CACHE or ~/.cache/pneumonia",
    )
    add_threshold_option(parser)
    parser.add_argument("--tta", type=bool, default=False, help="test-time augmentation")
    parser.add_argument(
        "--shift", type=bool, default=False, help="also score under the acquisition shifts"
    )
    parser.add_argument("--seed", type=Seed, default=0, help="of the bootstrap intervals")
    parser.add_argument("--batch_size", type=PositiveInt, default=256, help="images per batch")
    add_device_option(parser)
    return parser


def pick_folder(root: str, split: str | None) -> Path:
    """The folder of class folders to evaluate on."""
    from pneumonia.data.kermany import find_splits

    splits = find_splits(root)
    if set(splits) == {"train"} and splits["train"] == Path(root) and split is None:
        return Path(root)
    name = split or ("test" if "test" in splits else "train")
    if name not in splits:
        raise UserError(
            f"{root} has no {name}/ split: choose --data.split from {', '.join(splits)}"
        )
    return splits[name]


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    """Print one JSON object: the threshold used and where it came from, loss, accuracy,
    precision, recall, f1, specificity, auroc, ece, confusion_matrix [[TN, FP], [FN, TP]], n,
    ci95 {metric: [low, high]}, the same for each file-name family under "by_group" (when the
    names carry families: `pneumonia.data.groups`), and with --shift all of it under "shift"."""
    args = parse_args(build_parser(), argv)
    from pneumonia.core.caches import default_cache_dir
    from pneumonia.data.cache import load_or_decode
    from pneumonia.data.kermany import folder_classes, list_image_files
    from pneumonia.data.shifts import ShiftConfig, shifted
    from pneumonia.training.checkpoint import load_module

    check_device(args.device)
    override = threshold_override(args)
    module = load_module(args.ckpt, threshold=override)
    folder = pick_folder(args.data.root, args.data.split)
    cache_dir = Path(args.data.cache_dir) if args.data.cache_dir else default_cache_dir()
    intensity = module.hparams.get("intensity", "none")  # standardised as its training was

    def decoded(intensity: str):
        images = load_or_decode(
            list_image_files(folder),
            module.hparams["image_size"],
            cache_dir,
            args.data.skip_corrupt,
            roi=module.hparams.get("roi", "full"),  # a lung-field model sees lung fields
            intensity=intensity,
        )
        return for_model(module, replace(images, classes=folder_classes(folder)))

    images = decoded(intensity)
    result = {
        "threshold": float(module.hparams["threshold"]),
        "threshold_source": "checkpoint" if args.threshold == "checkpoint" else "--threshold",
        "tta": args.tta,
        **scored(module, images, args, progress=True),
    }
    if args.shift:
        # Re-imaged before the standardisation, which then sees what that scanner produced.
        raw = images if intensity == "none" else decoded("none")
        result["shift"] = scored(module, shifted(raw, ShiftConfig(), intensity), args)
    print(json.dumps(result))
    return result


def scored(module, images, args, progress: bool = False) -> dict:
    """Every metric with its 95% interval, the confusion matrix and n."""
    from pneumonia.inference.scoring import (
        predict_class_probabilities,
        predict_probabilities,
        score_classes,
        score_groups,
        score_with_intervals,
    )
    from pneumonia.metrics.classification import SCALARS

    probs = predict_probabilities(
        module, images.images, args.batch_size, args.device, progress, args.tta
    )
    values, _ = score_with_intervals(module, probs, images, args.seed)
    keys = ("loss", *SCALARS, "confusion_matrix", "n", "ci95")
    out = {k: values[k] for k in keys}
    if groups := score_groups(module, images, probs, args.seed):  # file-name families
        out["by_group"] = {name: {k: v[k] for k in keys} for name, v in groups.items()}
    if images.classes == module.classes and len(module.classes) > 2:
        class_probs = predict_class_probabilities(
            module, images.images, args.batch_size, args.device, False, args.tta
        )
        out["classes"] = score_classes(module, images, class_probs, args.seed)[0]
    return out


def for_model(module, images):
    """`images` labelled in the model's classes; a three-class model on images whose names do
    not give the cause is scored as pneumonia vs normal only (NORMAL is class 0 in both)."""
    from pneumonia.data.tasks import for_task

    task = "three_class" if len(module.classes) > 2 else "binary"
    try:
        return for_task(images, task)
    except UserError:
        return for_task(images, "binary")


if __name__ == "__main__":
    main()
