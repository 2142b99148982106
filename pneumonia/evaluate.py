"""`python -m pneumonia.evaluate --ckpt FILE --data.root DIR`: metrics of a checkpoint as JSON.

The checkpoint alone fixes the preprocessing (image size, one channel, normalisation), so any
folder with NORMAL/ and PNEUMONIA/ sub-folders (or a split layout, whose test/ is used) can be
evaluated.
"""

from __future__ import annotations

import json
from pathlib import Path

from jsonargparse import ArgumentParser

from pneumonia.checkpoint import load_module
from pneumonia.config import parse_args
from pneumonia.data.cache import default_cache_dir, load_or_decode
from pneumonia.data.kermany import find_splits, list_image_files
from pneumonia.errors import UserError, exit_on_user_error
from pneumonia.evaluation import evaluate_imageset
from pneumonia.metrics import SCALARS


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m pneumonia.evaluate",
        exit_on_error=False,
        allow_abbrev=False,
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--ckpt", type=str, required=True, help="checkpoint from pneumonia.fit")
    parser.add_argument("--data.root", type=str, required=True, help="folder of class folders")
    parser.add_argument(
        "--data.split",
        type=str | None,
        default=None,
        help="split folder to use in a train/val/test layout (default: test)",
    )
    parser.add_argument("--data.skip_corrupt", type=bool, default=False)
    parser.add_argument("--data.cache_dir", type=str | None, default=None)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--device", type=str, default="cpu", help="cpu or cuda")
    return parser


def pick_folder(root: str, split: str | None) -> Path:
    """The folder of class folders to evaluate on."""
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
    """Print one JSON object: accuracy, precision, recall, f1, specificity, auroc,
    confusion_matrix [[TN, FP], [FN, TP]] and n."""
    args = parse_args(build_parser(), argv)
    module = load_module(args.ckpt)
    folder = pick_folder(args.data.root, args.data.split)
    cache_dir = Path(args.data.cache_dir) if args.data.cache_dir else default_cache_dir()
    images = load_or_decode(
        list_image_files(folder), module.hparams.image_size, cache_dir, args.data.skip_corrupt
    )
    values, _ = evaluate_imageset(module, images, args.batch_size, args.device, progress=True)
    result = {k: values[k] for k in (*SCALARS, "confusion_matrix", "n")}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
