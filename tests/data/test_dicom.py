import io
import tracemalloc

import numpy as np
import pydicom
import pytest
import torch
from conftest import dicom_dataset as dataset
from hostile_files import MALFORMED, bomb_dicom, malformed_dicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from pneumonia.data.decode import CorruptImageError, decode_file, read_image
from pneumonia.data.dicom import decode_dicom


def dicom_bytes(ds: Dataset, **kw) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True, **kw)
    return buffer.getvalue()


def decoded(ds: Dataset) -> np.ndarray:
    image = decode_dicom(dicom_bytes(ds), "x.dcm")
    assert image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 1
    return image[0].numpy()


def refusal(data: bytes, name: str = "bad.dcm") -> str:
    with pytest.raises(CorruptImageError) as caught:
        decode_dicom(data, name)
    assert caught.value.args[0] == name
    return caught.value.args[1]


# 12-bit stored values; with RescaleSlope 2, RescaleIntercept -1024 they become x = 2s - 1024.
STORED_12 = np.array([[0, 432, 433], [512, 532, 600], [631, 632, 4095]], dtype=np.uint16)
# Window C 40, W 400: x <= 39.5 - 199.5 = -160 -> 0, x > 39.5 + 199.5 = 239 -> 255, else
# ((x - 39.5) / 399 + 0.5) * 255, rounded:
#   s   0 -> x -1024 -> 0         s 432 -> x -160 -> 0 (on the edge)
#   s 433 -> x -158  -> 1.278 -> 1     s 512 -> x 0 -> 102.256 -> 102
#   s 532 -> x 40    -> 127.820 -> 128 s 600 -> x 176 -> 214.737 -> 215
#   s 631 -> x 238   -> 254.361 -> 254 s 632 -> x 240 -> 255 (past the edge), s 4095 -> 255
WINDOWED_12 = np.array([[0, 0, 1], [102, 128, 215], [254, 255, 255]], dtype=np.uint8)


def windowed_12bit(**elements) -> Dataset:
    return dataset(
        STORED_12,
        bits_stored=12,
        RescaleSlope=2,
        RescaleIntercept=-1024,
        WindowCenter=[40, 500],  # several windows: the first is the one shown
        WindowWidth=[400, 2000],
        **elements,
    )


def test_8bit_without_window_stretches_min_to_max():
    pixels = np.array([[10, 60, 110, 210]] * 4, dtype=np.uint8)
    pixels[3] = [35, 85, 160, 185]
    # (v - 10) / 200 * 255: 60 -> 63.75 -> 64, 110 -> 127.5 -> 128, 35 -> 31.875 -> 32,
    # 85 -> 95.625 -> 96, 160 -> 191.25 -> 191, 185 -> 223.125 -> 223
    expected = np.array([[0, 64, 128, 255]] * 3 + [[32, 96, 191, 223]], dtype=np.uint8)
    np.testing.assert_array_equal(decoded(dataset(pixels)), expected)


def test_signed_pixels_without_window():
    pixels = np.array([[-100, 0], [100, 300]], dtype=np.int16)
    # (v + 100) / 400 * 255: 0 -> 63.75 -> 64, 100 -> 127.5 -> 128
    np.testing.assert_array_equal(decoded(dataset(pixels)), [[0, 64], [128, 255]])


def test_12bit_rescale_and_window_follow_the_standard_linear_function():
    np.testing.assert_array_equal(decoded(windowed_12bit()), WINDOWED_12)


def test_monochrome1_is_inverted():
    inverted = decoded(windowed_12bit(PhotometricInterpretation="MONOCHROME1"))
    np.testing.assert_array_equal(inverted, 255 - WINDOWED_12)


@pytest.mark.parametrize(
    ("function", "center", "width", "values", "expected"),
    [
        # ((x - c) / w + 0.5) * 255, x <= c - w/2 -> 0, x > c + w/2 -> 255
        ("LINEAR_EXACT", 0, 10, [-6, -5, 1, 3, 5, 6], [0, 0, 153, 204, 255, 255]),
        # 255 / (1 + exp(-4 (x - c) / w)): 0 -> 127.5 -> 128, 1 -> 186.42, -1 -> 68.58
        ("SIGMOID", 0, 4, [-1000, -1, 0, 1, 1000], [0, 69, 128, 186, 255]),
    ],
)
def test_voi_lut_functions(function, center, width, values, expected):
    pixels = np.array([values], dtype=np.int16)
    ds = dataset(pixels, WindowCenter=center, WindowWidth=width, VOILUTFunction=function)
    np.testing.assert_array_equal(decoded(ds), [expected])


def voi_lut_item(descriptor: list[int], data: list[int]) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = descriptor
    item.add_new("LUTData", "US", data)  # implicit-VR files store it as OW bytes
    return item


@pytest.mark.parametrize("implicit_vr", [False, True])
def test_voi_lut_sequence_applies_to_modality_values_before_any_window(implicit_vr):
    stored = np.array([[40, 50, 51, 52], [53, 54, 450, 0]], dtype=np.uint16)
    # + intercept 50 -> 90, 100, 101, ...; the LUT maps 100.. onto its 5 entries, values below
    # take the first entry and values past the end the last.
    ds = dataset(stored, RescaleSlope=1, RescaleIntercept=50, WindowCenter=0, WindowWidth=2)
    ds.VOILUTSequence = [voi_lut_item([5, 100, 8], [0, 50, 100, 200, 255])]
    if implicit_vr:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    np.testing.assert_array_equal(decoded(ds), [[0, 0, 50, 100], [200, 255, 255, 0]])


def test_voi_lut_scales_from_its_declared_bits():
    ds = dataset(np.array([[0, 1, 2]], dtype=np.uint16))
    ds.VOILUTSequence = [voi_lut_item([3, 0, 16], [0, 65535, 32768])]
    # 32768 / 65535 * 255 = 127.502 -> 128
    np.testing.assert_array_equal(decoded(ds), [[0, 255, 128]])


def test_8bit_voi_lut_longer_than_256_entries():
    """pydicom 3.0's apply_voi would wrap these indices at 256."""
    ds = dataset(np.array([[0, 100, 256, 299, 400]], dtype=np.uint16))
    ds.VOILUTSequence = [voi_lut_item([300, 0, 8], [i * 255 // 299 for i in range(300)])]
    np.testing.assert_array_equal(decoded(ds), [[0, 85, 218, 255, 255]])


def test_multi_frame_refused():
    ds = dataset(np.zeros((2, 4, 4), dtype=np.uint8), NumberOfFrames=2)
    assert "multi-frame" in refusal(dicom_bytes(ds))


def test_rgb_refused():
    ds = dataset(np.zeros((4, 4), dtype=np.uint8))
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.PixelData = np.zeros((4, 4, 3), dtype=np.uint8).tobytes()
    assert "RGB" in refusal(dicom_bytes(ds))


def test_without_pixel_data_refused():
    ds = dataset(np.zeros((4, 4), dtype=np.uint8))
    del ds.PixelData
    assert refusal(dicom_bytes(ds)) == "DICOM file without pixel data"


@pytest.mark.parametrize("keep", [0, 100, 140, 300, -20, -3])
def test_truncated_refused(keep):
    data = dicom_bytes(windowed_12bit())
    assert refusal(data[:keep])


def test_garbage_named_dcm_refused():
    assert refusal(b"not a dicom file at all " * 20, "notes.dcm")


def test_rle_lossless_decodes_like_uncompressed():
    ds = windowed_12bit()
    ds.compress(RLELossless)
    assert pydicom.dcmread(io.BytesIO(dicom_bytes(ds))).file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(decoded(ds), WINDOWED_12)


def test_jpeg_baseline_decodes_through_pillow():
    pixels = np.add.outer(np.arange(16), np.arange(16)).astype(np.uint8) * 8
    jpeg = io.BytesIO()
    Image.fromarray(pixels).save(jpeg, "JPEG", quality=95)
    # Window C 128, W 256 maps 0..255 onto itself: ((x - 127.5) / 255 + 0.5) * 255 = x.
    ds = dataset(pixels, WindowCenter=128, WindowWidth=256)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([jpeg.getvalue()])
    expected = np.asarray(Image.open(jpeg))
    np.testing.assert_array_equal(decoded(ds), expected)


def test_a_jpeg_larger_than_its_dicom_header_says_is_refused_before_it_is_decoded():
    jpeg = io.BytesIO()
    Image.fromarray(np.zeros((1000, 2000), np.uint8)).save(jpeg, "JPEG")
    ds = dataset(np.zeros((16, 16), np.uint8))  # the header: 16 x 16
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([jpeg.getvalue()])
    assert "2000 x 1000 pixels, but its header says 16 x 16" in refusal(dicom_bytes(ds))


def without_decoder() -> UID:
    """A compressed transfer syntax none of the installed pixel-data handlers decodes."""
    for syntax in (JPEGLSLossless, JPEGLSNearLossless, JPEGLosslessSV1):
        if not get_decoder(syntax).is_available:
            return syntax
    pytest.skip("every JPEG-LS / JPEG Lossless handler is installed")


def encapsulated(syntax: str, frame: bytes) -> bytes:
    ds = dataset(np.zeros((4, 4), dtype=np.uint8))
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([frame])
    # pydicom wants to be told how to write the dataset around a syntax it does not know
    return dicom_bytes(ds, implicit_vr=False, little_endian=True)


def test_compressed_without_a_decoder_names_the_transfer_syntax():
    syntax = without_decoder()
    reason = refusal(encapsulated(syntax, b"\xff\xd8" + bytes(30)))
    assert syntax.name in reason and str(syntax) in reason and "pylibjpeg" in reason


def test_unknown_transfer_syntax_refused_by_uid():
    assert "1.2.3.4.5.6" in refusal(encapsulated("1.2.3.4.5.6", bytes(16)))


def test_corrupt_compressed_data_refused():
    reason = refusal(encapsulated(JPEGBaseline8Bit, b"\xff\xd8 not a jpeg"))
    assert JPEGBaseline8Bit.name in reason


def test_public_path_reads_dicom_with_and_without_suffix(tmp_path):
    pixels = (np.arange(32 * 24).reshape(32, 24) % 4096).astype(np.uint16)
    data = dicom_bytes(dataset(pixels, bits_stored=12))
    (tmp_path / "chest.dcm").write_bytes(data)
    (tmp_path / "chest").write_bytes(data)  # no suffix: found by the preamble's DICM mark
    image = decode_file(tmp_path / "chest.dcm", 16)
    assert image.dtype == torch.uint8 and image.shape == (1, 16, 16)
    assert torch.equal(read_image(tmp_path / "chest"), read_image(tmp_path / "chest.dcm"))
    assert read_image(tmp_path / "chest").shape == (1, 32, 24)


def test_dcm_without_preamble_or_file_meta(tmp_path):
    """Some writers store the bare dataset: its encoding stands in for the transfer syntax."""
    ds = dataset(np.array([[10, 60, 110, 210]], dtype=np.uint8))
    del ds.file_meta
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=True, little_endian=True)
    (tmp_path / "bare.dcm").write_bytes(buffer.getvalue())
    assert read_image(tmp_path / "bare.dcm").tolist() == [[[0, 64, 128, 255]]]


# Files are untrusted: every header value read is checked, and whatever pydicom or numpy make
# of the rest is a CorruptImageError; the decode budget holds for deflated data sets too.


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_header_value_is_refused_by_name(case):
    assert refusal(malformed_dicom(case), f"{case}.dcm") == MALFORMED[case]


def test_any_other_failure_inside_the_decoder_is_a_corrupt_image(monkeypatch):
    data = dicom_bytes(windowed_12bit())

    def fail(error):
        def apply(*args):
            raise error

        return apply

    monkeypatch.setattr("pneumonia.data.dicom.apply_modality_lut", fail(KeyError("0028,3002")))
    assert refusal(data) == "malformed DICOM file: '0028,3002'"
    # A MemoryError means the budget let something through: never disguised as a bad file.
    monkeypatch.setattr("pneumonia.data.dicom.apply_modality_lut", fail(MemoryError()))
    with pytest.raises(MemoryError):
        decode_dicom(data, "x.dcm")


def test_a_deflated_data_set_decodes_and_inflates_no_further_than_its_header_says():
    ds = windowed_12bit()
    plain = decoded(ds)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    np.testing.assert_array_equal(decoded(ds), plain)
    np.testing.assert_array_equal(decoded(ds), WINDOWED_12)
    # 64 x 64 pixels declared, 64 MiB held: refused at the declared size plus a margin.
    tracemalloc.start()
    try:
        reason = refusal(bomb_dicom(64, holds=64 << 20))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert reason.startswith("deflated DICOM data set inflates past ")
    assert reason.endswith(" bytes, more than its header allows")
    assert peak < 8 << 20, peak


def test_decoding_holds_a_few_bytes_a_pixel():
    """The display pipeline's float64 values are computed a band of rows at a time: the peak
    is the stored pixels and the output, not 8 bytes a pixel several times over (28 before)."""
    side = 2048
    ramp = (np.add.outer(np.arange(side), np.arange(side)) % 4096).astype(np.uint16)
    ds = dataset(ramp, 12, RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=40)
    ds.WindowWidth = 4000
    data = dicom_bytes(ds)
    tracemalloc.start()
    try:
        image = decode_dicom(data, "large.dcm")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert image.shape == (1, side, side)
    assert peak / side**2 < 8, f"{peak / side**2:.1f} bytes a pixel"
