"""What the tools write never destroys what they read, and a failed write says what to do:
`predict --output` / `--cam` and `export --onnx` against their own inputs, and a full disk
under each (one line naming the file, exit 1, no advice to resume what has no resume)."""

from __future__ import annotations

import errno
import hashlib
import os
import pathlib
from pathlib import Path

import pytest
from conftest import write_image, write_tiny_checkpoint

from pneumonia import export, predict


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("model") / "best.ckpt")


@pytest.fixture
def images(tmp_path) -> Path:
    """x0.jpeg and x0.png: one stem, so overlays named after it would collide with x0.png."""
    folder = tmp_path / "images"
    write_image(folder / "x0.jpeg", 60, (40, 40), seed=0)
    for i in range(3):
        write_image(folder / f"x{i}.png", 100 + 30 * i, (40, 40), fmt="PNG", seed=i)
    return folder


def digests(*paths: Path) -> dict[str, str]:
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*")))]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


def exit_code(main, argv) -> int:
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    return stopped.value.code


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("alias", ["same", "symlink", "hard_link", "checkpoint"])
def test_predict_output_that_is_an_input_or_the_model_is_refused(
    alias, model, images, tmp_path, capsys
):
    """The output under any name of an input (or of the checkpoint) is refused, naming both,
    before anything is written."""
    target = model if alias == "checkpoint" else images / "x1.png"
    output = {"same": target, "checkpoint": target}.get(alias, tmp_path / "out.csv")
    if alias == "symlink":
        output.symlink_to(target)
    elif alias == "hard_link":
        os.link(target, output)
    before = digests(images, model, output)
    argv = ["--ckpt", str(model), str(images), "--output", str(output)]
    assert exit_code(predict.main, argv) == 2
    assert one_line(capsys) == (
        f"error: --output {output} would overwrite {target}, which this command reads: "
        f"choose another path for --output"
    )
    assert digests(images, model, output) == before


@pytest.mark.parametrize("where", ["the input folder", "a folder holding an input file"])
def test_predict_cam_folder_holding_inputs_is_refused(where, model, images, capsys):
    """Overlays are named <stem>.png: in the inputs' folder they would replace x0.png (with
    x0.jpeg's heatmap) and x1.png, x2.png with their own."""
    inputs = [str(images)] if where == "the input folder" else [str(images / "x2.png")]
    before = digests(images)
    assert exit_code(predict.main, ["--ckpt", str(model), *inputs, "--cam", str(images)]) == 2
    line = one_line(capsys)
    assert line.startswith(f"error: --cam {images} ")
    assert inputs[0] in line and "choose a folder outside the inputs' folders" in line
    assert digests(images) == before


def test_export_onto_its_checkpoint_is_refused(model, capsys):
    before = digests(model)
    assert exit_code(export.main, ["--ckpt", str(model), "--onnx", str(model)]) == 2
    assert one_line(capsys) == (
        f"error: --onnx {model} would overwrite {model}, which this command reads: choose "
        f"another path for --onnx"
    )
    assert digests(model) == before


@pytest.fixture
def full_disk(monkeypatch):
    """Every write of file contents fails as write() does on a full disk: ENOSPC, no name."""

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pathlib.Path, "write_bytes", full)


@pytest.mark.parametrize("option", ["--output", "--cam"])
def test_a_full_disk_during_predict_names_the_file_and_says_run_again(
    option, model, images, tmp_path, capsys, full_disk
):
    out = tmp_path / ("out.csv" if option == "--output" else "cams")
    argv = ["--ckpt", str(model), str(images), option, str(out)]
    assert exit_code(predict.main, argv) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    written = out if option == "--output" else out / "x0.png"  # the first overlay
    assert line == (
        f"error: {written}: No space left on device: free some space, then run the command again"
    )
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_full_disk_during_export_names_the_file_and_says_run_again(
    model, tmp_path, capsys, full_disk
):
    out = tmp_path / "model.onnx"
    assert exit_code(export.main, ["--ckpt", str(model), "--onnx", str(out)]) == 1
    assert one_line(capsys) == (
        f"error: {out}: No space left on device: free some space, then run the command again"
    )
    assert not out.exists() and not list(tmp_path.rglob("*.tmp"))
