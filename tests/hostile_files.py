"""Hostile inputs, built small and fast: decompression bombs (a PNG and a deflated DICOM whose
headers promise far more pixels than any radiograph has) and DICOMs with malformed header
values. Shared by the decoder, predict, fit and evaluate tests; and `predict_in_child`, which
runs predict on hostile model files in a child whose memory growth is measured on its own."""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
from conftest import dicom_dataset
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian


def zeros_deflated(size: int, wbits: int = zlib.MAX_WBITS, block: int = 1 << 22) -> bytes:
    """`size` zero bytes, deflated (a zlib stream, or raw with wbits -15), without compressing
    them all: every full-flushed block of zeros compresses to the same bytes, so one block's
    output is repeated."""
    packer = zlib.compressobj(9, zlib.DEFLATED, wbits)
    if size < 2 * block:
        return packer.compress(bytes(size)) + packer.flush()
    head = packer.compress(bytes(block)) + packer.flush(zlib.Z_FULL_FLUSH)
    repeat = packer.compress(bytes(block)) + packer.flush(zlib.Z_FULL_FLUSH)
    count, rest = divmod(size, block)
    tail = packer.compress(bytes(rest)) + packer.flush()
    if wbits < 0:
        return head + repeat * (count - 1) + tail
    # Adler-32 of n zero bytes: A stays 1, B counts the bytes (RFC 1950).
    checksum = (size % 65521) << 16 | 1
    return head + repeat * (count - 1) + tail[:-4] + struct.pack(">I", checksum)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    body = kind + payload
    return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))


def bomb_png(side: int = 30000) -> bytes:
    """An all-black 8-bit grey PNG of side x side pixels (30000: 900 MP in under 1 MB)."""
    rows = (side + 1) * side  # each row: filter byte 0, then the pixels
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zeros_deflated(rows))
        + png_chunk(b"IEND", b"")
    )


def bomb_dicom(side: int = 12000, holds: int | None = None) -> bytes:
    """A deflated 16-bit DICOM of side x side black pixels (12000: 288 MB inflated, 280 KB
    on disk); `holds`: the bytes its pixel data element holds, when not what the header says."""
    ds = dicom_dataset(np.zeros((1, 1), np.uint16))
    del ds.PixelData
    ds.Rows = ds.Columns = side
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    pixels = side * side * 2 if holds is None else holds
    element = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, pixels)
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    start = packer.compress(body.getvalue() + element) + packer.flush(zlib.Z_FULL_FLUSH)
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    out.write(bytes(128) + b"DICM")
    write_file_meta_info(out, ds.file_meta)
    return out.getvalue() + start + zeros_deflated(pixels, -zlib.MAX_WBITS)


def dicom_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def raw(ds: Dataset, tag: int, vr: str, value: bytes) -> None:
    """Put a value into `ds` as a file would hold it, unchecked (pydicom refuses to set what
    the standard forbids, but reads it from a file with a warning)."""
    ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


def lut_item(descriptor: list[int] | None, data: list[int]) -> Dataset:
    item = Dataset()
    if descriptor is not None:
        item.LUTDescriptor = descriptor
    item.add_new("LUTData", "US", data)
    return item


# What each malformed file breaks, and the reason it is refused with.
MALFORMED = {
    "frames_abc": "NumberOfFrames 'abc' is not a whole number",
    "voi_lut_empty_item": "VOI LUT without LUTDescriptor",
    "voi_lut_two_values": "VOI LUT descriptor of 2 values, expected 3",
    "voi_lut_bits_0": "VOI LUT of 0-bit entries, expected 8 to 16",
    "voi_lut_bits_40": "VOI LUT of 40-bit entries, expected 8 to 16",
    "voi_lut_empty_data": "VOI LUT without data",
    "voi_lut_constant": "its VOI LUT shows every pixel as one grey level",
    "slope_nan": "RescaleSlope nan is not a finite number",
    "slope_inf": "RescaleSlope inf is not a finite number",
    "intercept_inf": "RescaleIntercept -inf is not a finite number",
    "slope_zero": "RescaleSlope 0 maps every pixel to one value",
    "center_nan": "WindowCenter nan is not a finite number",
    "width_nan": "WindowWidth nan is not a finite number",
    "window_far_away": "its window (centre 90000, width 400) shows every pixel as one grey level",
    "rows_zero": "Rows 0, expected at least 1",
    "bits_allocated_12": "BitsAllocated 12, expected 1, 8, 16, 32 or 64",
    "modality_lut_bits_12": "modality LUT of 12-bit entries, expected 8 or 16",
}


def malformed_dicom(case: str) -> bytes:
    """A 12-bit ramp whose header breaks as MALFORMED[case] says."""
    ds = dicom_dataset(np.arange(64, dtype=np.uint16).reshape(8, 8) * 60, bits_stored=12)
    voi_luts = {
        "voi_lut_empty_item": Dataset(),
        "voi_lut_two_values": lut_item([4, 0], [0, 10, 20, 30]),
        "voi_lut_bits_0": lut_item([4, 0, 0], [0, 10, 20, 30]),
        "voi_lut_bits_40": lut_item([4, 0, 40], [0, 10, 20, 30]),
        "voi_lut_empty_data": lut_item([4, 0, 16], []),
        "voi_lut_constant": lut_item([4, 0, 16], [700, 700, 700, 700]),
    }
    if case in voi_luts:
        ds.VOILUTSequence = [voi_luts[case]]
    elif case == "frames_abc":
        raw(ds, 0x00280008, "IS", b"abc ")
    elif case in ("slope_nan", "slope_inf", "slope_zero"):
        ds.RescaleSlope, ds.RescaleIntercept = (
            {"slope_nan": "nan", "slope_inf": "inf"}.get(case, 0),
            -1024,
        )
    elif case == "intercept_inf":
        ds.RescaleSlope, ds.RescaleIntercept = 1, "-inf"
    elif case in ("center_nan", "width_nan"):
        ds.WindowCenter, ds.WindowWidth = ("nan", 400) if case == "center_nan" else (40, "nan")
    elif case == "window_far_away":
        ds.WindowCenter, ds.WindowWidth = 90000, 400
    elif case == "rows_zero":
        ds.Rows = 0
    elif case == "bits_allocated_12":
        ds.BitsAllocated = 12
    elif case == "modality_lut_bits_12":
        ds.ModalityLUTSequence = [lut_item([4, 0, 12], [0, 1, 2, 3])]
    return dicom_bytes(ds)


@contextlib.contextmanager
def released_after(fifo: Path, seconds: float):
    """A reader that blocks on `fifo` (a decoder that opens it, as before named pipes were
    refused unopened) is released after `seconds` by a writer that opens and closes it: a
    failing test fails, never hangs."""
    if not stat.S_ISFIFO(os.lstat(fifo).st_mode):  # nothing could block on anything else
        yield
        return
    done = threading.Event()

    def release():
        while not done.wait(seconds):
            with contextlib.suppress(OSError):  # no reader yet
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


# What a refused file may cost the tool, beyond the memory it had before: reading a 3 MB
# checkpoint and building its model on the meta device. A 65536-wide SE-ResNet-18 asks for
# 154 GB, a 256-wide one for 0.7 GB, a 60000 px image for 14 GB.
GROWTH_MB = 300
SECONDS = 10  # each refusal, after the imports (0.01 to 0.8 s measured)

# Run in a child: each case's predict.main, with its exit code, stderr, time and growth.
CHILD = """
import contextlib, io, json, sys, time
import onnxruntime
from pneumonia import predict
import pneumonia.inference.onnx_model

def kb(field):  # this process's own figures: ru_maxrss would carry the parent's over exec
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field)).split()[1])

for label, argv in json.loads(sys.argv[1]):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak starts again from the resident size: each case on its own
    before, err, start = kb("VmRSS:"), io.StringIO(), time.perf_counter()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            predict.main(argv)
        code = 0
    except SystemExit as stop:
        code = stop.code
    except BaseException as exc:
        code, err = repr(type(exc)), io.StringIO(repr(exc))
    print(json.dumps({"label": label, "code": code, "err": err.getvalue(),
                      "seconds": time.perf_counter() - start,
                      "growth_mb": max(kb("VmHWM:") - before, 0) / 1024}), flush=True)
"""


def predict_in_child(cases: list[tuple[str, list[str]]]) -> dict[str, dict]:
    """predict.main on each (label, argv) in one child process: label -> its exit code,
    stderr, seconds and memory growth (MB)."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
        cwd=Path(__file__).parents[1],
    )
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(cases), done.stderr[-2000:]
    return {r["label"]: r for r in results}


def one_line(result: dict, path: Path, *parts: str) -> None:
    """Exit 2, one line naming the file and saying `parts`, fast and without allocating."""
    err = result["err"]
    assert result["code"] == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert str(path) in err and all(p in err for p in parts), err
    assert result["growth_mb"] < GROWTH_MB and result["seconds"] < SECONDS, result
