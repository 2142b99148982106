"""pydicom's reading validation is off while our DICOM decoder reads, and only then: a caller's
own setting (a strict one included) holds before, after and between our reads, whichever
threads overlap."""

from __future__ import annotations

import io
import threading

import numpy as np
import pydicom
import pytest
from conftest import dicom_dataset
from hostile_files import dicom_bytes, malformed_dicom, raw

from pneumonia.data.decode import CorruptImageError
from pneumonia.data.dicom import LENIENT, decode_dicom


@pytest.fixture
def strict_caller(monkeypatch):
    """Files written, then a caller that reads DICOM strictly (monkeypatch puts pydicom's
    setting back): {name: bytes}."""
    files = {"long": long_window_center(), "slope_inf": malformed_dicom("slope_inf")}
    monkeypatch.setattr(pydicom.config.settings, "_reading_validation_mode", pydicom.config.RAISE)
    return files


def long_window_center() -> bytes:
    """A 12-bit ramp whose Window Center has 19 characters, more than DS's 16: strict pydicom
    refuses to read it, the decoder reads the number."""
    ds = dicom_dataset(np.arange(64, dtype=np.uint16).reshape(8, 8) * 60, bits_stored=12)
    raw(ds, 0x00281050, "DS", b"2048.00000000000001 ")
    raw(ds, 0x00281051, "DS", b"4096")
    return dicom_bytes(ds)


def test_a_value_the_standard_forbids_is_read_as_under_the_default(strict_caller):
    data = strict_caller["long"]
    strict = decode_dicom(data, "x.dcm")
    with pytest.raises(OverflowError, match="16 characters"):  # the caller's own reads stay strict
        pydicom.dcmread(io.BytesIO(data)).get("WindowCenter")
    pydicom.config.settings.reading_validation_mode = pydicom.config.WARN
    assert (decode_dicom(data, "x.dcm") == strict).all()


def test_the_callers_setting_is_back_after_a_read_and_after_a_refusal(strict_caller):
    decode_dicom(strict_caller["long"], "x.dcm")
    assert pydicom.config.settings.reading_validation_mode == pydicom.config.RAISE
    with pytest.raises(CorruptImageError):
        decode_dicom(strict_caller["slope_inf"], "x.dcm")
    assert pydicom.config.settings.reading_validation_mode == pydicom.config.RAISE


def test_overlapping_reads_in_two_threads_restore_the_setting_when_the_last_ends(strict_caller):
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with LENIENT:
            first_in.set()
            second_in.wait(10)
        first_out.set()

    def second():
        first_in.wait(10)
        with LENIENT:
            second_in.set()
            first_out.wait(10)  # the first has left; this read is still going
            seen["inside"] = pydicom.config.settings.reading_validation_mode

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert seen["inside"] == pydicom.config.IGNORE
    assert pydicom.config.settings.reading_validation_mode == pydicom.config.RAISE
