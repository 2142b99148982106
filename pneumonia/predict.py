"""`python -m pneumonia.predict --ckpt FILE INPUT...`: P(pneumonia) and a decision for new
radiographs (JPEG, PNG, GIF, WebP, DICOM; folders are walked recursively).

One row per readable image on stdout (or --output FILE), as CSV, JSON or JSON lines: path,
probability, decision, threshold, model, image_size, checkpoint. Unreadable files are listed
on stderr with the reason and skipped. Exit code: 0 when every input was read, 3 when some
were skipped (the rows of the others are still written), 2 on a usage error (a bad
checkpoint, no images at all, an --output or --cam that would overwrite an input), 1 when a
file cannot be written.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Literal

from jsonargparse import ArgumentParser

from pneumonia.core.bounds import PositiveInt
from pneumonia.core.errors import UserError, exit_on_user_error
from pneumonia.core.files import (
    check_not_input,
    check_not_input_folder,
    check_writable_folder,
    write_text_atomic,
)
from pneumonia.run.config import (
    add_device_option,
    add_threshold_option,
    check_device,
    parse_args,
    threshold_override,
    tool_parser,
)

SOME_SKIPPED = 3  # the exit code when some inputs could not be read
# pneumonia.inference.predictor (torch, the models) loads in the functions that use it, so that
# --help and a usage error answer at once.


def build_parser() -> ArgumentParser:
    parser = tool_parser("python -m pneumonia.predict", __doc__)
    parser.add_argument("inputs", nargs="+", help="image or DICOM files, or folders of them")
    parser.add_argument("--ckpt", type=str | None, default=None, help="best.ckpt of a run")
    parser.add_argument(
        "--onnx", type=str | None, default=None, help="a model from pneumonia.export instead"
    )
    add_threshold_option(parser)
    parser.add_argument(
        "--format",
        type=Literal["csv", "json", "jsonl"],
        default="csv",
        help="CSV with a header, a JSON array, or JSON lines",
    )
    parser.add_argument(
        "--output", type=str | None, default=None, help="the file to write; null: stdout"
    )
    parser.add_argument(
        "--cam", type=str | None, default=None, help="folder for one Grad-CAM overlay per image"
    )
    parser.add_argument("--batch_size", type=PositiveInt, default=64, help="images per batch")
    add_device_option(parser)
    return parser


def load_predictor(args):
    """The torch or the ONNX predictor the arguments name."""
    from pneumonia.inference.predictor import Predictor

    if (args.ckpt is None) == (args.onnx is None):
        raise UserError("give exactly one of --ckpt FILE (a checkpoint) or --onnx FILE")
    threshold = threshold_override(args)
    check_device(args.device)
    if args.onnx is not None:
        if args.cam:
            raise UserError("--cam needs the PyTorch model: use --ckpt instead of --onnx")
        from pneumonia.inference.onnx_model import OnnxPredictor

        return OnnxPredictor(args.onnx, threshold)
    return Predictor.from_checkpoint(args.ckpt, threshold, args.device)


def format_rows(rows: list[dict], fmt: str) -> str:
    """The rows as CSV (header first), a JSON array, or JSON lines."""
    from pneumonia.inference.predictor import COLUMNS

    if fmt == "json":
        return json.dumps(rows, indent=1) + "\n"
    if fmt == "jsonl":
        return "".join(json.dumps(row) + "\n" for row in rows)
    out = io.StringIO()
    columns = list(rows[0]) if rows else list(COLUMNS)
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def check_outputs(args, files: list[Path]) -> None:
    """Nothing written may replace what is read: an input, the model, an input's folder."""
    if args.output:
        check_not_input("--output", args.output, [args.ckpt or args.onnx, *files])
    if args.cam:
        folders = [item for item in args.inputs if Path(item).is_dir()]
        check_not_input_folder("--cam", args.cam, [*folders, *files])


@exit_on_user_error
def main(argv: list[str] | None = None) -> list[dict]:
    """Score the inputs; return the rows (for tests), exit 3 when some were skipped."""
    args = parse_args(build_parser(), argv)
    from pneumonia.inference.predictor import HeatmapWriter, find_inputs, predict_files

    if args.output:
        check_writable_folder("--output", Path(args.output).parent)
    if args.cam:
        check_writable_folder("--cam", args.cam)
    predictor = load_predictor(args)
    files, missing = find_inputs(args.inputs)
    if not files and missing:
        raise UserError(f"{missing[0][0]}: {missing[0][1]}: give image files or folders")
    check_outputs(args, files)
    writer = HeatmapWriter(predictor, args.cam) if args.cam else None
    rows, unreadable = predict_files(predictor, files, args.batch_size, on_batch=writer)
    if writer is not None:
        for row in rows:
            row["heatmap"] = writer.written[row["path"]]
    text = format_rows(rows, args.format)
    if args.output:
        write_text_atomic(Path(args.output), text)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    skipped = missing + unreadable
    for path, reason in skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if skipped:
        total = len(files) + len(missing)
        print(
            f"{len(skipped)} of {total} inputs could not be read (listed above); "
            f"{len(rows)} scored",
            file=sys.stderr,
        )
        raise SystemExit(SOME_SKIPPED)
    return rows


if __name__ == "__main__":
    main()
