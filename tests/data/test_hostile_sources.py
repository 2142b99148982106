"""Hostile files among training and evaluation images: a decompression bomb, a malformed DICOM,
a named pipe or a device is one line naming it, or with data.skip_corrupt is left out while
the job goes on (`fit`, `evaluate`)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from conftest import write_image, write_kermany_folder
from hostile_files import MALFORMED, bomb_dicom, bomb_png, malformed_dicom, released_after

from pneumonia import evaluate, fit
from pneumonia.core.errors import UserError
from pneumonia.data.decode import decode_files
from pneumonia.data.kermany import ImageFile, list_image_files

S = 32
TOO_LARGE = "pixels, over the decode limit of 67,108,864 (8192 x 8192)"
HAS_DEV_ZERO = Path("/dev/zero").exists()


def plant(folder: Path, kind: str) -> tuple[Path, str]:
    """One hostile file of `kind` in `folder`, and the reason it is refused with."""
    if kind == "bomb.png":
        (folder / kind).write_bytes(bomb_png())
        return folder / kind, f"30000 x 30000 {TOO_LARGE}"
    if kind == "bomb.dcm":
        (folder / kind).write_bytes(bomb_dicom())
        return folder / kind, f"12000 x 12000 {TOO_LARGE}"
    if kind == "pipe.dcm":  # opening it would block: it is refused from its stat
        os.mkfifo(folder / kind)
        return folder / kind, "not a regular file (a named pipe)"
    if kind == "zero.dcm":  # reading it would never end
        (folder / kind).symlink_to("/dev/zero")
        return folder / kind, "not a regular file (a character device)"
    (folder / f"{kind}.dcm").write_bytes(malformed_dicom(kind))
    return folder / f"{kind}.dcm", MALFORMED[kind]


KINDS = ["bomb.png", "bomb.dcm", "pipe.dcm", *(["zero.dcm"] if HAS_DEV_ZERO else []), *MALFORMED]


@pytest.mark.parametrize("kind", KINDS)
def test_a_hostile_file_is_named_or_with_skip_corrupt_left_out(tmp_path, kind):
    good = write_image(tmp_path / "good.png", 120, (40, 30), fmt="PNG")
    bad, reason = plant(tmp_path, kind)
    files = [ImageFile(good, 0, "p1"), ImageFile(bad, 1, "p2")]
    with released_after(bad, 10), pytest.raises(UserError) as caught:
        decode_files(files, S)
    assert str(caught.value) == (
        f"cannot decode image {bad} ({reason}): remove it, or set data.skip_corrupt true to skip "
        f"such files"
    )
    with released_after(bad, 10):
        images, skipped, _ = decode_files(files, S, skip_corrupt=True)
    assert skipped == [str(bad)] and images.names == ["good.png"]


def test_special_files_in_class_folders_are_listed_for_the_decoder_to_name(kermany_root):
    normal = kermany_root / "NORMAL"
    os.mkfifo(normal / "pipe.jpeg")
    (normal / "gone.jpeg").symlink_to(normal / "nowhere.jpeg")  # leads nowhere: left out
    (normal / "sub").mkdir()
    names = {f.path.name for f in list_image_files(kermany_root)}
    assert "pipe.jpeg" in names and "gone.jpeg" not in names and "sub" not in names


TINY = [
    "--federated.enabled", "false",
    "--figures_every", "0",
    "--data.image_size", "32",
    "--data.batch_size", "16",
    "--model.name", "resnet18",
    "--model.width", "16",
    "--trainer.max_epochs", "1",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]  # fmt: skip


@pytest.fixture(scope="module")
def hostile_root(tmp_path_factory):
    """A Kermany folder with every kind of hostile file among its NORMAL images."""
    root = write_kermany_folder(tmp_path_factory.mktemp("hostile") / "chest_xray")
    planted = dict(plant(root / "NORMAL", kind) for kind in KINDS)
    return root, planted


def test_fit_with_skip_corrupt_goes_on_without_the_hostile_files(
    hostile_root, tmp_path, capsys, recwarn
):
    root, planted = hostile_root
    run_dir = tmp_path / "run"
    argv = [*TINY, "--data.root", str(root), "--data.skip_corrupt", "true"]
    summary = fit.main([*argv, "--run_dir", str(run_dir)])
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    split = (run_dir / "split.csv").read_text()
    assert not any(path.name in split for path in planted)
    warned = [str(w.message) for w in recwarn if "unreadable" in str(w.message)]
    assert warned == [f"skipped {len(planted)} unreadable file(s), e.g. {min(map(str, planted))}"]
    assert summary["val"]["n"] > 0


def test_fit_without_skip_corrupt_names_the_file_in_one_line(tmp_path, capsys):
    root = write_kermany_folder(tmp_path / "chest_xray")
    bomb, reason = plant(root / "PNEUMONIA", "bomb.png")
    with pytest.raises(SystemExit) as stopped:
        fit.main([*TINY, "--data.root", str(root), "--runs_root", str(tmp_path / "runs")])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: cannot decode image {bomb} ({reason}): remove it, or set data.skip_corrupt "
        f"true to skip such files"
    )


def test_evaluate_skips_hostile_files_with_skip_corrupt_and_names_one_without(
    hostile_root, tiny_checkpoint, tmp_path, capsys
):
    root, planted = hostile_root
    base = ["--ckpt", str(tiny_checkpoint), "--data.root", str(root)]
    result = evaluate.main(
        [*base, "--data.cache_dir", str(tmp_path / "a"), "--data.skip_corrupt", "true"]
    )
    good = len(list_image_files(root)) - len(planted)
    assert result["n"] == good and json.loads(capsys.readouterr().out)["n"] == good
    with pytest.raises(SystemExit) as stopped:
        evaluate.main([*base, "--data.cache_dir", str(tmp_path / "b")])
    assert stopped.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    first = min(map(str, planted))
    assert re.fullmatch(
        rf"error: cannot decode image {re.escape(first)} \(.+\): remove it, or set "
        r"data\.skip_corrupt true to skip such files",
        line,
    )
