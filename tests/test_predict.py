"""`python -m pneumonia.predict`: rows for new radiographs, skipped files and exit codes."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch
from conftest import run_predict, write_dicom, write_image, write_tiny_checkpoint
from PIL import Image

from pneumonia import predict
from pneumonia.data.decode import decode_file
from pneumonia.inference.predictor import COLUMNS, Predictor


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A folder of a grey JPEG, an RGB PNG, a DICOM without a suffix in a sub-folder, a
    hidden file and a text file; and a truncated JPEG kept apart."""
    root = tmp_path_factory.mktemp("inputs")
    folder = root / "xrays"
    write_image(folder / "a.jpeg", 60, (50, 40))
    write_image(folder / "b.png", 170, (40, 60), mode="RGB", fmt="PNG")
    ramp = np.linspace(0, 4095, 48 * 48).reshape(48, 48).astype(np.uint16)
    (folder / "sub").mkdir()
    write_dicom(folder / "sub" / "IM0001", ramp)
    (folder / ".DS_Store").write_bytes(b"\0\0")
    (folder / "notes.txt").write_text("not an image")
    broken = root / "broken" / "c.jpeg"
    broken.parent.mkdir()
    broken.write_bytes((folder / "a.jpeg").read_bytes()[:200])
    return folder, broken


run = run_predict


def test_a_folder_gives_one_csv_row_per_image_with_the_checkpoint_identity(
    tiny_checkpoint, inputs, capsys
):
    folder, _ = inputs
    code, out, err = run(capsys, "--ckpt", str(tiny_checkpoint), str(folder))
    assert code == 0 and "skipped" not in err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["path"] for r in rows] == [
        str(folder / "a.jpeg"),
        str(folder / "b.png"),
        str(folder / "sub" / "IM0001"),  # DICOM found by its mark, not by a suffix
    ]
    assert list(rows[0]) == list(COLUMNS)
    predictor = Predictor.from_checkpoint(tiny_checkpoint)
    images = torch.stack([decode_file(r["path"], 32) for r in rows])
    expected = predictor.probabilities(images)
    for row, p in zip(rows, expected.tolist(), strict=True):
        assert float(row["probability"]) == pytest.approx(p, abs=1e-6)
        assert row["decision"] == ("PNEUMONIA" if p > 0.5 else "NORMAL")
        assert row["model"] == "se_resnet18" and row["image_size"] == "32"
        assert row["checkpoint"] == predictor.model.checkpoint and len(row["checkpoint"]) == 16


def test_an_unreadable_file_is_listed_skipped_and_exits_3(tiny_checkpoint, inputs, capsys):
    folder, broken = inputs
    missing = folder / "nope.png"
    code, out, err = run(
        capsys, "--ckpt", str(tiny_checkpoint), "--format", "jsonl", str(broken), str(folder),
        str(missing),
    )  # fmt: skip
    assert code == predict.SOME_SKIPPED == 3
    assert len(out.splitlines()) == 3  # the readable ones still answered
    assert f"skipped {broken}: truncated or corrupt image data" in err
    assert f"skipped {missing}: no such file or folder" in err
    assert "2 of 5 inputs could not be read" in err
    assert "Traceback" not in err


def test_threshold_json_output_file_and_heatmaps(tiny_checkpoint, inputs, capsys, tmp_path):
    folder, _ = inputs
    out_file, cams = tmp_path / "rows.json", tmp_path / "cam"
    code, out, _ = run(
        capsys, "--ckpt", str(tiny_checkpoint), str(folder), "--format", "json",
        "--output", str(out_file), "--threshold", "0.001", "--cam", str(cams),
    )  # fmt: skip
    assert code == 0 and out == ""  # the rows went to the file
    rows = json.loads(out_file.read_text())
    assert {r["decision"] for r in rows} == {"PNEUMONIA"} and rows[0]["threshold"] == 0.001
    for row in rows:
        overlay = Image.open(row["heatmap"])
        source = Image.open(row["path"]) if not row["path"].endswith("IM0001") else None
        assert overlay.mode == "RGB"
        if source is not None:  # the radiograph at its own size at least, a colour bar beside
            assert overlay.width > source.width and overlay.height > source.height
    assert sorted(p.name for p in cams.iterdir()) == ["IM0001.png", "a.png", "b.png"]


def test_bad_inputs_are_one_line_and_write_nothing(tiny_checkpoint, inputs, capsys, tmp_path):
    folder, _ = inputs
    out_file = tmp_path / "rows.csv"
    code, _, err = run(capsys, "--ckpt", str(tmp_path / "none.ckpt"), str(folder),
                       "--output", str(out_file))  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and "none.ckpt does not exist" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(capsys, "--ckpt", str(tiny_checkpoint), str(empty))
    assert code == 2 and err.startswith("error: no image files") and err.count("\n") == 1
    code, _, err = run(capsys, "--ckpt", str(tiny_checkpoint), "--onnx", "m.onnx", str(folder))
    assert code == 2 and "exactly one of --ckpt" in err
    assert not out_file.exists()


def test_a_checkpoint_with_non_finite_weights_is_refused(tmp_path, inputs, capsys):
    path = write_tiny_checkpoint(tmp_path / "nan.ckpt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"]["model.fc.weight"][0, 0] = float("nan")
    torch.save(ckpt, path)
    code, out, err = run(capsys, "--ckpt", str(path), str(inputs[0]))
    assert code == 2 and "non-finite weights (model.fc.weight)" in err and out == ""


def test_batches_come_back_in_order_with_the_unreadable_marked(inputs, tmp_path):
    from pneumonia.inference.predictor import decoded_batches

    folder, broken = inputs
    files = sorted(folder.glob("*.*g")) * 2 + [broken]  # 5 files: batches of 2, 2, 1
    batches = list(decoded_batches(files, 16, 2))
    assert [len(b) for b in batches] == [2, 2, 1]
    assert [d.path for b in batches for d in b] == files
    assert batches[-1][0].image is None and batches[-1][0].error
    assert all(d.image.shape == (1, 16, 16) for b in batches[:2] for d in b)
