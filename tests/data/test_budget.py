"""The decode budget: bombs refused from their headers (fast, in little memory), images at the
limit decoded in bounded memory, only regular files read, formats told by content."""

import contextlib
import io
import os
import resource
import struct
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_image
from hostile_files import bomb_dicom, bomb_png, png_chunk
from PIL import Image

from pneumonia.data.budget import LIMIT_SIDE, MAX_FILE_BYTES
from pneumonia.data.decode import (
    CorruptImageError,
    ImageTooLarge,
    decode_bytes,
    image_format,
    read_image,
)
from pneumonia.data.headers import read_header

# A bomb is refused within this much memory (tracemalloc: Python and numpy allocations) and
# time; the real figures are about 1 MB and a few milliseconds.
REFUSAL_BYTES = 16 << 20
REFUSAL_SECONDS = 1.0


def refused(data: bytes, name: str) -> tuple[str, float, int]:
    """(the reason ImageTooLarge gives, seconds, peak bytes allocated) of decoding `data`."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ImageTooLarge) as caught:
            decode_bytes(data, name)
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert caught.value.args[0] == name
    return caught.value.args[1], seconds, peak


@pytest.mark.parametrize(
    ("build", "name", "size"),
    [(bomb_png, "bomb.png", "30000 x 30000"), (bomb_dicom, "bomb.dcm", "12000 x 12000")],
)
def test_a_decompression_bomb_is_refused_from_its_header(build, name, size):
    data = build()
    assert len(data) < 1 << 20  # under 1 MB on disk, 0.9 G pixels (PNG) or 288 MB (DICOM)
    reason, seconds, peak = refused(data, name)
    assert reason == f"{size} pixels, over the decode limit of 67,108,864 (8192 x 8192)"
    assert seconds < REFUSAL_SECONDS and peak < REFUSAL_BYTES, (seconds, peak)


def gif_header(screen: int, frame: int) -> bytes:
    """A GIF whose screen is `screen` pixels a side and whose one frame claims `frame`."""
    screen_descriptor = struct.pack("<HHBBB", screen, screen, 0, 0, 0)
    image = b"\x2c" + struct.pack("<HHHHB", 0, 0, frame, frame, 0) + b"\x02\x02\x44\x01\x00"
    return b"GIF89a" + screen_descriptor + image + b"\x3b"


def webp_header(side: int) -> bytes:
    """An extended (VP8X) WebP header claiming a canvas of `side` pixels a side."""
    vp8x = b"\0\0\0\0" + (side - 1).to_bytes(3, "little") * 2
    body = b"WEBP" + b"VP8X" + struct.pack("<I", len(vp8x)) + vp8x
    return b"RIFF" + struct.pack("<I", len(body)) + body


def jpeg_header(width: int, height: int) -> bytes:
    """SOI, an APP0 segment, then a baseline frame header of this size."""
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8\xff\xe0" + struct.pack(">H", 16) + b"JFIF\0" + bytes(9) + sof


@pytest.mark.parametrize(
    ("data", "name", "size"),
    [
        (gif_header(16, 30000), "frame.gif", "30000 x 30000"),  # the frame, not the screen
        (webp_header(16000), "canvas.webp", "16000 x 16000"),
        (jpeg_header(60000, 50000), "huge.jpeg", "60000 x 50000"),
        (bomb_png(LIMIT_SIDE + 1)[:100], "cut.png", "8193 x 8193"),  # the header is enough
    ],
)
def test_every_format_is_held_to_the_pixel_budget_by_its_header(data, name, size):
    reason, seconds, peak = refused(data, name)
    assert reason.startswith(f"{size} pixels, over the decode limit")
    assert seconds < REFUSAL_SECONDS and peak < REFUSAL_BYTES


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP"])
def test_headers_give_the_size_decoders_give(fmt):
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((37, 50), np.uint8)).save(buffer, fmt)
    header = read_header(buffer.getvalue())
    assert (header.format, header.width, header.height, header.frames) == (fmt.lower(), 50, 37, 1)


def test_a_jpeg_with_stray_bytes_before_a_marker_decodes_as_libjpeg_decodes_it():
    buffer = io.BytesIO()
    Image.fromarray(np.full((64, 80), 90, np.uint8)).save(buffer, "JPEG")
    data = buffer.getvalue()
    frame = data.index(b"\xff\xc0")
    stray = data[:frame] + b"\x00\x00" + data[frame:]  # libjpeg: "2 extraneous bytes"
    assert read_header(stray).width == 80
    assert decode_bytes(stray, "stray.jpeg").shape == (1, 64, 80)


def test_an_animated_gif_is_refused_before_its_frames_are_decoded(monkeypatch):
    frames = [Image.new("L", (20, 20), v) for v in (0, 90, 180)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    assert read_header(buffer.getvalue()).frames == 3

    def never(*args, **kw):
        raise AssertionError("decoded")

    monkeypatch.setattr("pneumonia.data.decode.decode_image", never)
    with pytest.raises(CorruptImageError, match="3 frames, expected one image"):
        decode_bytes(buffer.getvalue(), "moving.gif")


def resident_peak(work) -> tuple[object, float]:
    """(what `work()` returns, MiB the resident set rose to above where it was): the kernel's
    high-water mark (ru_maxrss) is reset to the current size first (/proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("cannot reset the resident high-water mark here")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    result = work()
    return result, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


@pytest.mark.skipif(sys.platform != "linux", reason="a Linux high-water mark")
def test_resident_memory_of_bombs_and_of_an_image_at_the_limit():
    def attempt(data, name):
        with pytest.raises(ImageTooLarge):
            decode_bytes(data, name)

    for bomb, name in ((bomb_png(), "bomb.png"), (bomb_dicom(), "bomb.dcm")):
        _, mib = resident_peak(lambda: attempt(bomb, name))  # noqa: B023
        assert mib < 32, (name, mib)  # the decoders before the budget: 5 GB and more
    at_limit = bomb_png(LIMIT_SIDE)
    image, mib = resident_peak(lambda: decode_bytes(at_limit, "limit.png"))
    assert image.shape == (1, LIMIT_SIDE, LIMIT_SIDE)
    assert mib < 256, mib  # the 64 MiB image and the decoder's working memory


# Only regular files are read.


@pytest.fixture
def fifo(tmp_path):
    """A named pipe named like a DICOM; a reader still blocked on it when the test ends (the
    code before it was refused) is released, so that a failing test cannot hang."""
    path = tmp_path / "pipe.dcm"
    os.mkfifo(path)
    yield path
    with contextlib.suppress(OSError):  # no reader: nothing blocked
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


def in_thread(work, seconds: float = 10.0):
    """What `work()` raises or returns, failing when it takes longer than `seconds`."""
    result = {}

    def run():
        try:
            result["value"] = work()
        except Exception as err:
            result["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s"
    return result


def test_a_named_pipe_is_refused_unopened(fifo):
    start = time.perf_counter()
    result = in_thread(lambda: read_image(fifo), 5.0)
    assert time.perf_counter() - start < 1.0
    error = result.get("error")
    assert isinstance(error, CorruptImageError)
    assert error.args == (str(fifo), "not a regular file (a named pipe)")


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_a_device_behind_a_link_is_refused_and_links_to_files_still_work(tmp_path):
    (tmp_path / "zero.dcm").symlink_to("/dev/zero")
    with pytest.raises(CorruptImageError) as caught:
        read_image(tmp_path / "zero.dcm")
    assert caught.value.args[1] == "not a regular file (a character device)"
    real = write_image(tmp_path / "real.png", 120, (30, 20), fmt="PNG")
    (tmp_path / "link.png").symlink_to(real)
    assert torch.equal(read_image(tmp_path / "link.png"), read_image(real))


def test_a_file_over_the_byte_budget_is_refused_from_its_size(tmp_path):
    sparse = tmp_path / "huge.png"
    with open(sparse, "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)  # no disk space: a hole
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLarge, match=f"file of {MAX_FILE_BYTES + 1:,} bytes, over"):
            read_image(sparse)
        assert tracemalloc.get_traced_memory()[1] < REFUSAL_BYTES
    finally:
        tracemalloc.stop()


# Formats are told by content.


def test_a_png_named_dcm_is_decoded_as_png(tmp_path):
    path = write_image(tmp_path / "scan.dcm", 120, (30, 20), fmt="PNG")
    assert image_format(path.read_bytes(), path.name) == "png"
    assert read_image(path).shape == (1, 20, 30)


def test_the_dicom_mark_wins_and_a_dcm_name_counts_only_without_other_magic():
    png = bomb_png(4)
    assert image_format(bytes(128) + b"DICM" + png, "x.png") == "dicom"
    assert image_format(png[:8] + png_chunk(b"IEND", b""), "x.dcm") == "png"
    assert image_format(b"\x08\x00\x05\x00CS\x0a\x00", "bare.dcm") == "dicom"
    assert image_format(b"plain text", "notes.txt") is None
