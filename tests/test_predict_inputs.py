"""`python -m pneumonia.predict` on hostile inputs: decompression bombs, malformed DICOMs,
named pipes and devices are each named and skipped, the other files still get their rows, and
the command returns promptly with exit code 3."""

from __future__ import annotations

import csv
import io
import os
import time
from pathlib import Path

import pytest
from conftest import run_predict, write_image
from hostile_files import MALFORMED, bomb_dicom, bomb_png, malformed_dicom, released_after

from pneumonia import predict

HAS_DEV_ZERO = Path("/dev/zero").exists()


run = run_predict


@pytest.fixture(scope="module")
def hostile_folder(tmp_path_factory):
    """Two readable images (one through a link, one PNG named .dcm) among bombs, every
    malformed DICOM, a named pipe and a link to /dev/zero named like DICOMs."""
    folder = tmp_path_factory.mktemp("hostile") / "in"
    good = write_image(folder / "good.png", 120, (40, 30), fmt="PNG")
    (folder / "link.png").symlink_to(good)
    write_image(folder / "scan.dcm", 90, (30, 40), fmt="PNG")
    (folder / "bomb.png").write_bytes(bomb_png())
    (folder / "bomb.dcm").write_bytes(bomb_dicom())
    for case in MALFORMED:
        (folder / f"{case}.dcm").write_bytes(malformed_dicom(case))
    os.mkfifo(folder / "pipe.dcm")
    os.mkfifo(folder / "pipe")  # no suffix: where a DICOM mark would be looked for
    if HAS_DEV_ZERO:
        (folder / "zero.dcm").symlink_to("/dev/zero")
    return folder


def expected_skips(folder: Path) -> dict[str, str]:
    too_large = "pixels, over the decode limit of 67,108,864 (8192 x 8192)"
    skips = {
        "bomb.png": f"30000 x 30000 {too_large}",
        "bomb.dcm": f"12000 x 12000 {too_large}",
        "pipe": "not a regular file (a named pipe)",
        "pipe.dcm": "not a regular file (a named pipe)",
        **{f"{case}.dcm": reason for case, reason in MALFORMED.items()},
    }
    if HAS_DEV_ZERO:
        skips["zero.dcm"] = "not a regular file (a character device)"
    return {str(folder / name): reason for name, reason in skips.items()}


def test_every_hostile_file_is_named_and_skipped_and_the_others_scored(
    tiny_checkpoint, hostile_folder, capsys
):
    start = time.perf_counter()
    with (
        released_after(hostile_folder / "pipe.dcm", 20),
        released_after(hostile_folder / "pipe", 20),
    ):
        code, out, err = run(capsys, "--ckpt", str(tiny_checkpoint), str(hostile_folder))
    assert time.perf_counter() - start < 15  # a bomb is refused from its header, a pipe unopened
    assert code == predict.SOME_SKIPPED
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["path"] for r in rows] == [
        str(hostile_folder / name) for name in ("good.png", "link.png", "scan.dcm")
    ]
    assert rows[0]["probability"] == rows[1]["probability"]  # the link reads its target
    skips = expected_skips(hostile_folder)
    lines = err.strip().splitlines()
    assert sorted(lines[:-1]) == sorted(f"skipped {path}: {why}" for path, why in skips.items())
    total = len(skips) + 3
    assert lines[-1] == f"{len(skips)} of {total} inputs could not be read (listed above); 3 scored"


def test_special_files_named_on_the_command_line_are_refused_unopened(
    tiny_checkpoint, hostile_folder, capsys
):
    pipe = hostile_folder / "pipe.dcm"
    good = hostile_folder / "good.png"
    with released_after(pipe, 20):
        code, out, err = run(capsys, "--ckpt", str(tiny_checkpoint), str(pipe), str(good))
    assert code == predict.SOME_SKIPPED and len(out.splitlines()) == 2
    assert f"skipped {pipe}: not a regular file (a named pipe)\n" in err
    if HAS_DEV_ZERO:
        zero = hostile_folder / "zero.dcm"
        code, out, err = run(capsys, "--ckpt", str(tiny_checkpoint), str(zero))
        assert code == 2 and out == ""
        line = f"error: {zero}: not a regular file (a character device): give image files or"
        assert err == f"{line} folders\n"
