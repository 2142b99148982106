"""ONNX export (`pneumonia.export`, `pneumonia.inference.onnx_model`): the graph scores as the
checkpoint does, carries what a client needs in its metadata, and `predict --onnx` answers as
`--ckpt`.

One untrained SE-ResNet-18 (width 16, 32 px: conftest's tiny checkpoint) is exported once for
the whole file.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest
import torch
from conftest import TINY_CARD, write_image, write_tiny_checkpoint
from hostile_files import one_line, predict_in_child

from pneumonia import export, predict
from pneumonia.core.errors import UserError
from pneumonia.data.decode import decode_file
from pneumonia.inference.onnx_model import METADATA_KEYS, OnnxPredictor
from pneumonia.inference.predictor import Predictor, file_sha256
from pneumonia.training.checkpoint import read_checkpoint

# float32 in both runtimes, the same operations fused and ordered differently: the largest
# differences measured (30 random batches, the JPEG files, all-black and all-white images)
# were 2.4e-7 on probabilities and 6.3e-7 on logits, far inside these bounds.
PROB_TOL, LOGIT_TOL = 1e-4, 1e-3
# (brightness, (width, height), mode) of the JPEG files: odd sizes, grey and colour
JPEGS = [(40, (50, 37), "L"), (90, (64, 64), "RGB"), (140, (32, 32), "L"),
         (200, (80, 60), "L"), (120, (37, 50), "RGB"), (60, (200, 120), "L")]  # fmt: skip


@dataclass
class Exported:
    ckpt: Path
    onnx: Path
    folder: Path  # JPEG files
    metadata: dict
    printed: str
    threshold: float


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Exported:
    """A checkpoint with a model card and a threshold between its scores of the JPEG files
    (so that both decisions occur), exported once into a folder that does not exist yet."""
    tmp = tmp_path_factory.mktemp("export")
    ckpt = write_tiny_checkpoint(tmp / "best.ckpt")
    folder = tmp / "images"
    for i, (mean, size, mode) in enumerate(JPEGS):
        write_image(folder / f"x{i}.jpeg", mean, size, mode, seed=i)
    scores = Predictor.from_checkpoint(ckpt).probabilities(jpeg_images(folder)).sort().values
    # Three below, three above, none near it (the untrained model scores them 0.61 to 0.68):
    # no difference of the ONNX graph's size can flip a decision.
    threshold = float(scores[2:4].mean())
    assert (scores - threshold).abs().min() > 1e-3
    write_tiny_checkpoint(ckpt, threshold=threshold)
    out = tmp / "onnx" / "model.onnx"
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        metadata = export.main(["--ckpt", str(ckpt), "--onnx", str(out)])
    return Exported(ckpt, out, folder, metadata, stdout.getvalue(), threshold)


def jpeg_images(folder: Path) -> torch.Tensor:
    """The folder's JPEG files decoded as predict decodes them: uint8 [N, 1, 32, 32]."""
    return torch.stack([decode_file(p, 32) for p in sorted(folder.glob("*.jpeg"))])


def torch_outputs(predictor: Predictor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits = predictor.module(images)
    return predictor.module.positive_probability(logits), logits


def test_the_graph_scores_as_the_checkpoint_within_tolerance(exported):
    """|P_onnx - P_torch| <= 1e-4 and |logit_onnx - logit_torch| <= 1e-3 on 8 random uint8
    images and on decoded JPEG files (measured at most 2.4e-7 and 6.3e-7); batches of 1 and of 8
    both run (the batch axis is dynamic)."""
    reference = Predictor.from_checkpoint(exported.ckpt)
    onnx_model = OnnxPredictor(exported.onnx)
    generator = torch.Generator().manual_seed(1)
    random = torch.randint(0, 256, (8, 1, 32, 32), dtype=torch.uint8, generator=generator)
    for images in (random, jpeg_images(exported.folder)):
        probs, logits = onnx_model.outputs(images)
        want_probs, want_logits = torch_outputs(reference, images)
        assert probs.shape == (len(images),) and logits.shape == (len(images), 2)
        assert (probs - want_probs).abs().max() <= PROB_TOL
        assert (logits - want_logits).abs().max() <= LOGIT_TOL
        assert torch.allclose(onnx_model.probabilities(images), probs)
        assert torch.allclose(reference.probabilities(images), want_probs, atol=PROB_TOL)
    one = onnx_model.probabilities(random[:1])
    assert one.shape == (1,)
    assert torch.allclose(one, onnx_model.probabilities(random)[:1], atol=PROB_TOL)


def test_the_metadata_tells_a_client_the_preprocessing_and_the_threshold(exported):
    proto = onnx.load(str(exported.onnx))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert set(METADATA_KEYS) <= set(meta) and meta == exported.metadata
    recipe, _, _ = read_checkpoint(exported.ckpt)
    assert int(meta["image_size"]) == recipe.image_size == 32
    assert float(meta["threshold"]) == exported.threshold == recipe.threshold
    assert (float(meta["mean"]), float(meta["std"])) == (recipe.mean, recipe.std)
    assert json.loads(meta["classes"]) == ["NORMAL", "PNEUMONIA"]
    assert meta["positive_class"] == "PNEUMONIA" and meta["model"] == "se_resnet18"
    assert meta["checkpoint"] == file_sha256(exported.ckpt)
    assert json.loads(meta["model_card"]) == TINY_CARD
    sentence = meta["preprocessing"]
    normalisation = (f"mean {recipe.mean}", f"std {recipe.std}")
    for part in ("grey", "32x32", "0-255", "[N, 1, 32, 32]", "by 255", *normalisation):
        assert part in sentence
    (graph_input,) = proto.graph.input
    dims = graph_input.type.tensor_type.shape.dim
    assert graph_input.name == "images" and dims[0].dim_param  # a named, dynamic batch axis
    assert [d.dim_value for d in dims[1:]] == [1, 32, 32]
    assert [o.name for o in proto.graph.output] == ["probability", "logits"]
    # The whole Model of the checkpoint comes back, and a threshold given overrides its own.
    assert OnnxPredictor(exported.onnx).model == Predictor.from_checkpoint(exported.ckpt).model
    assert OnnxPredictor(exported.onnx, threshold=0.9).model.threshold == 0.9
    lines = exported.printed.splitlines()
    assert len(lines) == 1 and str(exported.onnx) in lines[0] and "MB" in lines[0]
    assert sentence in lines[0]


def test_predict_with_onnx_answers_as_with_the_checkpoint(exported, tmp_path):
    def rows(*model: str) -> list[dict]:
        path = tmp_path / "rows.json"
        argv = [*model, str(exported.folder), "--format", "json", "--output", str(path)]
        predict.main(argv)
        return json.loads(path.read_text())

    by_onnx = rows("--onnx", str(exported.onnx))
    by_ckpt = rows("--ckpt", str(exported.ckpt))
    assert len(by_onnx) == len(by_ckpt) == 6
    difference = max(
        abs(a["probability"] - b["probability"]) for a, b in zip(by_onnx, by_ckpt, strict=True)
    )
    assert difference <= PROB_TOL
    columns = ("path", "decision", "threshold", "model", "image_size", "checkpoint")
    assert [[r[c] for c in columns] for r in by_onnx] == [[r[c] for c in columns] for r in by_ckpt]
    assert {r["decision"] for r in by_onnx} == {"NORMAL", "PNEUMONIA"}


def test_a_file_that_is_not_a_checkpoint_is_one_line_and_writes_nothing(tmp_path, capsys):
    junk = tmp_path / "notes.txt"
    junk.write_text("not a checkpoint\n")
    out = tmp_path / "model.onnx"
    with pytest.raises(SystemExit) as stop:
        export.main(["--ckpt", str(junk), "--onnx", str(out)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(junk) in err and "Traceback" not in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_onnx_files_the_predictor_cannot_use_are_one_line_errors_naming_them(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not an onnx model at all")
    with pytest.raises(UserError, match=f"^{junk} is not an ONNX model"):
        OnnxPredictor(junk)
    with pytest.raises(UserError, match=f"^{tmp_path / 'absent.onnx'}: no such file"):
        OnnxPredictor(tmp_path / "absent.onnx")
    # A valid ONNX model, but not one of ours: nothing says how to feed it.
    identity = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Identity", ["images"], ["probability"])],
            "identity",
            [onnx.helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT, [None])],
            [onnx.helper.make_tensor_value_info("probability", onnx.TensorProto.FLOAT, [None])],
        ),
        opset_imports=[onnx.helper.make_opsetid("", 18)],
    )
    foreign = tmp_path / "foreign.onnx"
    onnx.save(identity, str(foreign))
    with pytest.raises(UserError, match=f"^{foreign} has no pneumonia metadata") as err:
        OnnxPredictor(foreign)
    assert "\n" not in str(err.value)


def edited_onnx(source: Path, out: Path, metadata_size: int | None, graph_size: int | None):
    """A copy of `source` whose metadata image_size or graph input sides say otherwise."""
    model = onnx.load(str(source))
    if metadata_size is not None:
        next(p for p in model.metadata_props if p.key == "image_size").value = str(metadata_size)
    if graph_size is not None:
        dims = model.graph.input[0].type.tensor_type.shape.dim
        dims[2].dim_value = dims[3].dim_value = graph_size
    onnx.save(model, str(out))
    return out


def test_onnx_sizes_that_lie_are_refused_in_one_line_before_any_image_is_resized(
    exported, tmp_path
):
    """The graph's input fixes the image size: metadata that disagrees, or a size out of
    range (60000 px: 14 GB an image), is refused by predict before it decodes anything."""
    files = {
        "both_60000": edited_onnx(exported.onnx, tmp_path / "a.onnx", 60000, 60000),
        "says_48": edited_onnx(exported.onnx, tmp_path / "b.onnx", 48, None),
        "graph_60000": edited_onnx(exported.onnx, tmp_path / "c.onnx", None, 60000),
        "folder": tmp_path,
    }
    image = str(next(exported.folder.glob("*.jpeg")))
    done = predict_in_child([(k, ["--onnx", str(f), image]) for k, f in files.items()])
    one_line(done["both_60000"], files["both_60000"], "image_size 60000", ">= 16 and <= 2048")
    one_line(done["says_48"], files["says_48"], "says image_size 48", "1, 32, 32]")
    one_line(done["graph_60000"], files["graph_60000"], "image_size 32", "1, 60000, 60000]")
    one_line(done["folder"], tmp_path, "is a folder")
