"""A checkpoint as a self-contained ONNX graph, and the predictor that answers with it.

The graph takes what any client can make from an image file without this package:
    images       float32 [N, 1, S, S], grey pixel values 0-255 (`PREPROCESSING` says how)
and gives
    probability  float32 [N], P(positive class)
    logits       float32 [N, 2], in the order of the classes
dividing by 255 and normalising with the checkpoint's mean and std inside, as the module
does. N is a dynamic axis. The model's metadata_props carry what a client needs besides:
the image size, normalisation, threshold, classes, model name, the checkpoint's SHA-256
prefix, its model card and the preprocessing as a sentence (`METADATA_KEYS`).

`OnnxPredictor` scores with onnxruntime alone, no torch module in the loop, and answers in
the rows of `pneumonia.inference.predictor`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pneumonia.core.bounds import ImageSide, allowed, out_of_range
from pneumonia.core.errors import UserError, first_line
from pneumonia.core.files import write_bytes_atomic
from pneumonia.inference.predictor import Model, Predictor
from pneumonia.training.module import ClassifierModule, positive_indices

INPUT = "images"
OUTPUTS = ("probability", "logits")
# The oldest opset torch's exporter writes natively (older ones go through a version
# converter); onnxruntime reads it from 1.14 on.
OPSET = 18
METADATA_KEYS = (
    "image_size",
    "mean",
    "std",
    "threshold",
    "classes",
    "positive_class",
    "model",
    "checkpoint",
    "model_card",
    "preprocessing",
)
PREPROCESSING = (
    "decode to one grey channel (DICOM: modality LUT, VOI window, MONOCHROME1 inverted), "
    "resize the 8-bit image to {size}x{size} (bilinear, antialiased, aspect ratio not kept), "
    "{standardise}float32 pixel values 0-255, shape [N, 1, {size}, {size}]; the graph divides "
    "by 255 and normalises with mean {mean} and std {std}"
)
# What to do about a file whose metadata or graph cannot be used.
EXPORT_AGAIN = "export the checkpoint again: python -m pneumonia.export --ckpt CKPT --onnx FILE"
# data.intensity's step in that sentence (none: no step, the sentence of earlier exports).
STANDARDISE = {
    "none": "",
    "equalize": "then equalise its histogram (scikit-image equalize_hist, rounded to 8 bits), ",
    "clahe": "then CLAHE (scikit-image equalize_adapthist, clip limit 0.01, rounded to 8 bits), ",
}


class _Graph(torch.nn.Module):
    """What is exported: pixel values 0-255 in, (P(positive), logits) out. The module's own
    forward and softmax do the normalising, so the graph cannot drift from the checkpoint."""

    def __init__(self, module: ClassifierModule) -> None:
        super().__init__()
        self.module = module

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.module(images / 255.0)  # floats in [0, 1]: forward() normalises them
        return self.module.positive_probability(logits), logits


def export_onnx(ckpt: str | Path, out: Path) -> dict[str, str]:
    """Write the checkpoint's model to `out` as ONNX (atomically) and return the metadata
    written into it (`METADATA_KEYS`, as strings)."""
    predictor = Predictor.from_checkpoint(ckpt)
    hparams, model = predictor.module.hparams, predictor.model
    graph = _Graph(predictor.module).eval()
    # Two images, not one: torch.export specialises an example dimension of size 1.
    example = torch.zeros(2, 1, model.image_size, model.image_size)
    try:
        # The torch.export-based exporter: the legacy TorchScript one refuses AlexNet's
        # adaptive pooling at sizes whose feature map is not a multiple of 6.
        program = torch.onnx.export(
            graph,
            (example,),
            dynamo=True,
            verbose=False,  # its progress lines otherwise go to stdout
            opset_version=OPSET,
            input_names=[INPUT],
            output_names=list(OUTPUTS),
            dynamic_shapes={INPUT: {0: torch.export.Dim("batch", min=1)}},
        )
    except torch.onnx.OnnxExporterError as err:
        raise UserError(
            f"checkpoint {ckpt}: model {model.name!r} cannot be exported to ONNX: "
            f"{first_line(err, 120)}"
        ) from None
    assert program is not None  # the dynamo exporter always returns its program
    proto = program.model_proto
    metadata = {
        "image_size": str(model.image_size),
        "roi": model.roi,  # read as "full" when absent (files exported before data.roi)
        "intensity": model.intensity,  # read as "none" when absent (before data.intensity)
        "mean": repr(float(hparams["mean"])),
        "std": repr(float(hparams["std"])),
        "threshold": repr(model.threshold),
        "classes": json.dumps(list(model.classes)),
        "positive_class": model.positive_class,
        "model": model.name,
        "checkpoint": model.checkpoint,
        "model_card": json.dumps(model.card),
        "preprocessing": PREPROCESSING.format(
            size=model.image_size,
            mean=float(hparams["mean"]),
            std=float(hparams["std"]),
            standardise=STANDARDISE[model.intensity],
        ),
    }
    del proto.metadata_props[:]
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = f"pneumonia {model.name}: {metadata['preprocessing']}"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(Path(out), proto.SerializeToString())
    return metadata


class OnnxPredictor:
    """An exported model (`export_onnx`) ready to score uint8 images [N, 1, S, S] with
    onnxruntime, deciding at its threshold or `threshold`; `.model` as `Predictor`'s."""

    def __init__(self, path: str | Path, threshold: float | None = None) -> None:
        import onnxruntime as ort  # only the ONNX paths pay for it

        if threshold is not None and not 0 < threshold < 1:
            raise UserError(f"threshold {threshold}: give a probability between 0 and 1")
        self.path = Path(path)
        if self.path.is_dir():
            raise UserError(f"{path} is a folder: give a model file written by pneumonia.export")
        if not self.path.is_file():
            raise UserError(f"{path}: no such file: give a model written by pneumonia.export")
        data = self.path.read_bytes()  # a failed read is an OSError: exit 1, naming the path
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: its graph-optimiser notes are not ours
        # Its threads otherwise spin-wait between runs, on the cores that predict's decoding
        # threads are using for the next batch meanwhile.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except _ort_errors() as err:
            raise UserError(
                f"{path} is not an ONNX model onnxruntime can load ({first_line(err, 120)}): "
                f"give a model written by pneumonia.export"
            ) from None
        self.metadata = self.session.get_modelmeta().custom_metadata_map
        self.model = _model(self.metadata, path, threshold)
        names = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if names != [INPUT] or not set(OUTPUTS) <= set(outputs):
            raise UserError(
                f"{path}: its graph has inputs {names} and outputs {outputs}, not "
                f"{INPUT} -> {', '.join(OUTPUTS)}: export it again with pneumonia.export"
            )
        _check_graph_size(self.session.get_inputs()[0].shape, self.model.image_size, path)

    def outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(P(positive class) [N], logits [N, 2]) of uint8 images [N, 1, S, S]."""
        pixels = images.cpu().numpy().astype(np.float32)
        probability, logits = self.session.run(list(OUTPUTS), {INPUT: pixels})
        return torch.from_numpy(probability), torch.from_numpy(logits)

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """P(positive class) of each image."""
        return self.outputs(images)[0]

    def scores(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(P(positive class) [N], the class probabilities of a three-class model or None)."""
        probability, logits = self.outputs(images)
        if len(self.model.classes) <= 2:
            return probability, None
        return probability, logits.float().softmax(dim=1)


def _ort_errors() -> tuple[type[Exception], ...]:
    """What onnxruntime raises for a file it cannot load (its own classes, not RuntimeError)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoModel",
             "NotImplemented", "RuntimeException")  # fmt: skip
    return tuple(getattr(state, n) for n in names if hasattr(state, n))


def _model(metadata: dict[str, str], path: str | Path, threshold: float | None) -> Model:
    """The `Model` an exported file describes, or a one-line UserError naming the file."""
    missing = [k for k in METADATA_KEYS if k not in metadata]
    if missing:
        raise UserError(
            f"{path} has no pneumonia metadata ({', '.join(missing)} missing): "
            f"export the checkpoint with python -m pneumonia.export"
        )
    try:
        classes = tuple(json.loads(metadata["classes"]))
        card = json.loads(metadata["model_card"])
        model = Model(
            image_size=int(metadata["image_size"]),
            threshold=float(metadata["threshold"] if threshold is None else threshold),
            classes=classes,
            positive_class=metadata["positive_class"],
            name=metadata["model"],
            checkpoint=metadata["checkpoint"],
            card=card if isinstance(card, dict) else {},
            roi=metadata.get("roi", "full"),
            intensity=metadata.get("intensity", "none"),
        )
        valid = (
            model.image_size > 0
            and 0 < model.threshold < 1
            and len(classes) in (2, 3)
            and all(isinstance(c, str) for c in classes)
            and len(positive_indices(classes, model.positive_class)) >= 1
            and model.intensity in STANDARDISE
        )
    except (TypeError, ValueError, UserError):
        valid = False
    if not valid:
        raise UserError(
            f"{path}: its pneumonia metadata (image_size, threshold, classes, positive_class, "
            f"intensity) is not valid: {EXPORT_AGAIN}"
        )
    if out_of_range(model.image_size, ImageSide):  # before any image is resized to it
        raise UserError(
            f"{path}: its metadata image_size {model.image_size} is outside the range a model "
            f"may have ({allowed(ImageSide)}): {EXPORT_AGAIN}"
        )
    return model


def _check_graph_size(shape: list, image_size: int, path: str | Path) -> None:
    """The graph's input [N, 1, S, S] fixes the image size (every export does): metadata
    saying another is refused before any image is resized to it."""
    sides = shape[2:] if len(shape) == 4 else []
    if all(isinstance(s, int) for s in sides) and sides != [image_size, image_size]:
        raise UserError(
            f"{path}: its metadata says image_size {image_size}, but its graph takes images "
            f"of shape {shape}: {EXPORT_AGAIN}"
        )
