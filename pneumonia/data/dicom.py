"""Decode a DICOM radiograph into a grey uint8 tensor, shown as a radiology viewer shows it:
stored values -> modality LUT (rescale) -> VOI LUT or window -> 0..255, MONOCHROME1 inverted."""

from __future__ import annotations

import io
import re

import numpy as np
import pydicom
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut, get_decoder
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pneumonia.data.decode import CorruptImageError
from pneumonia.errors import first_line

GREY = ("MONOCHROME1", "MONOCHROME2")


def decode_dicom(data: bytes, name: str) -> torch.Tensor:
    """A DICOM file's bytes (`name` says where they came from) -> uint8 [1, H, W] at its own
    size, bright = dense as on a viewer's screen. One grey frame only: multi-frame and colour
    files, and compressed pixel data the installed pydicom handlers cannot decode, are
    refused. Raises CorruptImageError(name, why)."""
    ds = _read(data, name)
    values = apply_modality_lut(_stored_pixels(ds, name), ds).astype(np.float64)
    grey = np.floor(_voi(values, ds) * 255 + 0.5).clip(0, 255).astype(np.uint8)
    if ds.PhotometricInterpretation == "MONOCHROME1":  # the minimum is white: flip to bone-bright
        grey = 255 - grey
    return torch.from_numpy(np.ascontiguousarray(grey))[None]


def _read(data: bytes, name: str) -> Dataset:
    """The parsed dataset of one grey radiograph, or CorruptImageError saying why not."""
    try:
        # force: some writers leave out the preamble and file meta (decode.is_dicom lets
        # such .dcm files through).
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as err:  # pydicom parsing untrusted bytes can raise almost anything
        reason = f"truncated or corrupt DICOM file: {first_line(err)}"
        raise CorruptImageError(name, reason) from err
    if "PixelData" not in ds:
        raise CorruptImageError(name, "DICOM file without pixel data")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:  # which frame is the radiograph is not ours to guess
        reason = f"multi-frame DICOM ({frames} frames), expected one radiograph"
        raise CorruptImageError(name, reason)
    samples = ds.get("SamplesPerPixel", 1)
    photometric = str(ds.get("PhotometricInterpretation") or "no PhotometricInterpretation")
    if samples != 1 or photometric not in GREY:
        raise CorruptImageError(
            name,
            f"not a grey-scale DICOM ({photometric}, {samples} samples per pixel): "
            f"expected MONOCHROME1 or MONOCHROME2",
        )
    return ds


def _stored_pixels(ds: Dataset, name: str) -> np.ndarray:
    """The stored pixel values [H, W], decompressed by whichever pydicom handler can."""
    syntax = _transfer_syntax(ds, name)
    try:
        decodable = get_decoder(syntax).is_available
    except NotImplementedError:  # a private or unknown transfer syntax: no decoder at all
        decodable = False
    if not decodable:
        raise CorruptImageError(
            name,
            f"compressed as {_syntax_name(syntax)}, which the installed pixel-data handlers "
            f"cannot decode: install pylibjpeg[all] or convert it to uncompressed",
        )
    try:
        return ds.pixel_array
    except Exception as err:  # handlers report bad data with assorted exception types
        why = _handler_reason(err)
        if syntax.is_compressed:
            reason = f"cannot decode its {_syntax_name(syntax)} pixel data: {why}; it is "
            reason += "corrupt or needs pylibjpeg[all]"
        else:
            reason = f"truncated or corrupt pixel data: {why}"
        raise CorruptImageError(name, reason) from err


def _handler_reason(err: Exception) -> str:
    """The gist of a pixel-data handler's error, short enough for a one-line message."""
    # pydicom puts each plugin's own reason on the last line of a many-line message, and
    # follows a reason with " - " and guesses at the cause; Pillow names a BytesIO object.
    lines = str(err).strip().splitlines()
    why = lines[-1].strip().split(" - ")[0] if lines else type(err).__name__
    return re.sub(r"\s*<[^>]*>", "", why)[:160]


def _transfer_syntax(ds: Dataset, name: str) -> UID:
    """The file's transfer syntax; for a file without file meta, the encoding pydicom found
    while reading it (uncompressed pixel data only: compressed data needs the UID)."""
    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    if "TransferSyntaxUID" in meta:
        return UID(meta.TransferSyntaxUID)
    if ds["PixelData"].is_undefined_length:  # encapsulated, so compressed with who knows what
        raise CorruptImageError(name, "compressed DICOM pixel data without a transfer syntax")
    implicit, little = ds.original_encoding
    syntax = ExplicitVRBigEndian if little is False else ExplicitVRLittleEndian
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit is not False else syntax
    ds.file_meta = meta  # ds.pixel_array reads the syntax from here
    return meta.TransferSyntaxUID


def _syntax_name(syntax: UID) -> str:
    """A transfer syntax as its name and UID, e.g. 'JPEG-LS Lossless Image Compression
    (1.2.840.10008.1.2.4.80)'; the bare UID where pydicom knows no name for it."""
    return f"{syntax.name} ({syntax})" if syntax.name != str(syntax) else str(syntax)


def _voi(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """Modality values -> display grey 0..1: the first VOI LUT, else the first valid window,
    else the image's own min..max (what viewers show when the file suggests nothing)."""
    if ds.get("VOILUTSequence"):
        return _voi_lut(values, ds)
    windowed = _window(values, ds)
    if windowed is not None:
        return windowed
    low, high = values.min(), values.max()
    if high == low:  # a blank image: nothing to stretch
        return np.zeros_like(values)
    return (values - low) / (high - low)


def _voi_lut(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """The first VOI LUT (PS3.3 C.11.2.1.1), its output scaled from its declared bits to 0..1.
    Not pydicom's apply_voi: it indexes through an array of the LUT's entry type, so the
    indices of an 8-bit LUT with more than 256 entries wrap around (pydicom 3.0)."""
    item = ds.VOILUTSequence[0]
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    lut = item.LUTData
    if isinstance(lut, bytes):  # OW (always so in implicit-VR files): 16-bit words, file order
        lut = np.frombuffer(lut, dtype="<u2" if ds.original_encoding[1] is not False else ">u2")
    lut = np.atleast_1d(np.asarray(lut, dtype=np.float64))
    last = min(entries or 2**16, lut.size) - 1  # entries 0 means 2^16 (PS3.3 C.11.2.1.1.1)
    # Values below the first mapped one take the first entry, values past the end the last.
    index = np.clip(np.rint(values) - first, 0, last).astype(np.intp)
    return lut[index] / (2 ** max(bits, 1) - 1)


def _window(values: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """The first Window Center/Width by the file's VOI LUT Function (PS3.3 C.11.2.1.2,
    output 0..1), or None where there is none or its width is one the standard forbids."""
    try:
        center = float(np.atleast_1d(ds.get("WindowCenter"))[0])
        width = float(np.atleast_1d(ds.get("WindowWidth"))[0])
    except (TypeError, ValueError, IndexError):  # absent, empty or not a number
        return None
    function = str(ds.get("VOILUTFunction") or "LINEAR").upper()
    if function == "SIGMOID":
        if width <= 0:
            return None
        with np.errstate(over="ignore"):  # exp overflows to inf far below the centre: 0 out
            return 1 / (1 + np.exp(-4 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return None if width <= 0 else np.clip((values - center) / width + 0.5, 0, 1)
    if width < 1:  # LINEAR (the default, and for functions we do not know)
        return None
    if width == 1:  # the ramp below has no width left: a threshold
        return (values > center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
