"""`python -m pneumonia.export --ckpt FILE --onnx OUT`: a checkpoint as one ONNX file that
scores radiographs without this package (onnxruntime, or any ONNX runtime of opset 18).

The graph's input is `images`: float32 [N, 1, S, S] (N any batch size, S the checkpoint's
image size), grey pixel values 0-255. A client makes it as training did: decode the file to
one grey channel (DICOM: modality LUT, then the VOI LUT or window, MONOCHROME1 inverted),
resize the 8-bit image to S x S (bilinear, antialiased; the aspect ratio is not kept), cast
to float32. The graph divides by 255 and normalises with the checkpoint's mean and std
itself. Its outputs are `probability` [N], P(positive class), and `logits` [N, 2] in the
order of the classes; decide positive when the probability is above the threshold.

The model's metadata_props hold image_size, mean, std, threshold, classes (JSON),
positive_class, model, checkpoint (the first 16 hex digits of the checkpoint's SHA-256),
model_card (JSON) and preprocessing (the above as a sentence).
`python -m pneumonia.predict --onnx OUT INPUT...` scores with it. Prints one line: where the
file went, its size and the preprocessing. Exit code 2 on a bad checkpoint (or an --onnx that
is the checkpoint), 1 when the file cannot be written.
"""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ArgumentParser

from pneumonia.core.errors import UserError, exit_on_user_error
from pneumonia.core.files import check_not_input, check_writable_folder
from pneumonia.run.config import parse_args, tool_parser


def build_parser() -> ArgumentParser:
    parser = tool_parser("python -m pneumonia.export", __doc__)
    parser.add_argument("--ckpt", type=str, required=True, help="checkpoint from pneumonia.fit")
    parser.add_argument("--onnx", type=str, required=True, help="the ONNX file to write")
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict[str, str]:
    """Export; print one line; return the metadata written (for tests)."""
    args = parse_args(build_parser(), argv)
    from pneumonia.inference.onnx_model import export_onnx  # torch's exporter: not for --help

    out = Path(args.onnx)
    check_writable_folder("--onnx", out.parent)
    if out.is_dir():
        raise UserError(f"--onnx {out} is a folder: give the path of the file to write")
    check_not_input("--onnx", out, [args.ckpt])
    metadata = export_onnx(args.ckpt, out)
    size = out.stat().st_size / 1e6
    print(f"wrote {out} ({size:.1f} MB); input: {metadata['preprocessing']}", flush=True)
    return metadata


if __name__ == "__main__":
    main()
