"""Decode a DICOM radiograph into a grey uint8 tensor, shown as a radiology viewer shows it:
stored values -> modality LUT (rescale) -> VOI LUT or window -> 0..255, MONOCHROME1 inverted.

A file is untrusted input: every header value the decoder reads is checked, and one that
cannot give a sensible image is a CorruptImageError naming it; the decode budget
(`pneumonia.data.budget`) is checked from the header before any pixel is decoded, and a
deflated data set is inflated only as far as its header says it holds.

pydicom validates the values it reads against the standard; while one of our decodes runs (in
any thread) that validation is off (`LENIENT`), and the caller's setting is back once the last
one ends: importing this module changes nothing."""

from __future__ import annotations

import io
import math
import re
import threading
import zlib
from dataclasses import dataclass

import numpy as np
import pydicom
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.filebase import DicomBytesIO

# The file meta reader dcmread itself uses: a deflated data set must be recognised the way
# dcmread would recognise it, before dcmread inflates it whole.
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, get_decoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from pneumonia.core.errors import first_line
from pneumonia.data.budget import (
    MAX_FRAMES,
    MAX_HEADER_BYTES,
    MAX_PIXEL_BYTES,
    over_bytes,
    over_pixels,
)
from pneumonia.data.corrupt import CorruptImageError, ImageTooLarge
from pneumonia.data.headers import codestream_size

GREY = ("MONOCHROME1", "MONOCHROME2")
BITS_ALLOCATED = (1, 8, 16, 32, 64)
# An explicit-VR pixel data element's tag, VR, reserved bytes and 32-bit length.
ELEMENT_HEADER = 12
# What a deflated data set may hold after its pixel data (padding, digital signatures).
TRAILER_BYTES = 1 << 20
# Modality values become grey this many pixels at a time: the display pipeline's float64
# arithmetic (exact, as it always was) then needs a few MB, not 8 bytes a pixel several times.
CHUNK_PIXELS = 1 << 18


class LenientReading:
    """pydicom's reading validation off while any thread is inside (values the standard
    forbids are read as they are; those the decoder uses are checked here and refused by
    name, so pydicom's warnings about them would only add lines to the output). The setting
    is process-wide: the first to enter saves the caller's, the last to leave restores it, so
    serve's decode threads overlap without racing."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inside = 0
        self._saved: int | None = None

    def __enter__(self) -> None:
        settings = pydicom.config.settings
        with self._lock:
            if self._inside == 0:
                # The attribute, as pydicom's own disable_value_validation saves it: None
                # means "by config.enforce_valid_values", which the property would not keep.
                self._saved = settings._reading_validation_mode
                settings.reading_validation_mode = pydicom.config.IGNORE
            self._inside += 1

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._inside -= 1
            if self._inside == 0:
                pydicom.config.settings._reading_validation_mode = self._saved


LENIENT = LenientReading()


def decode_dicom(data: bytes, name: str) -> torch.Tensor:
    """A DICOM file's bytes (`name` says where they came from) -> uint8 [1, H, W] at its own
    size, bright = dense as on a viewer's screen. One grey frame only: multi-frame and colour
    files, and compressed pixel data the installed pydicom handlers cannot decode, are
    refused. Raises CorruptImageError(name, why), ImageTooLarge over the decode budget."""
    try:
        with LENIENT:  # pydicom reads element values lazily: the whole decode, not dcmread
            return _decode(data, name)
    except (CorruptImageError, MemoryError):
        raise  # ours, saying why; a MemoryError is a hole in the budget, never to be hidden
    except Exception as err:  # pydicom and numpy on untrusted values raise almost anything
        raise CorruptImageError(name, f"malformed DICOM file: {first_line(err)}") from err


def _decode(data: bytes, name: str) -> torch.Tensor:
    ds = _read(data, name)
    _check_modality(ds, name)
    voi = Voi.of(ds, name)
    stored = _stored_pixels(ds, name)
    del ds.PixelData  # decoded: the stored bytes need not stay in memory beside the values
    grey = _display(stored, ds, voi, name)
    if ds.PhotometricInterpretation == "MONOCHROME1":  # the minimum is white: flip to bone-bright
        np.subtract(255, grey, out=grey)
    return torch.from_numpy(grey)[None]


def _read(data: bytes, name: str) -> Dataset:
    """The parsed dataset of one grey radiograph within the decode budget, or
    CorruptImageError saying why not. Its header is read and checked first; a deflated data
    set is then inflated only as far as the header says it holds."""
    stream = _stream(data, name)
    pixel_bytes = _check_header(_parse(stream, name, header_only=True), name)
    if isinstance(stream, Inflating):  # the header ends at the pixel data element
        stream.limit = stream.tell() + ELEMENT_HEADER + pixel_bytes + 1 + TRAILER_BYTES
    stream.seek(0)
    ds = _parse(stream, name)
    stream.close()
    if "PixelData" not in ds:
        raise CorruptImageError(name, "DICOM file without pixel data")
    return ds


def _parse(stream: io.IOBase, name: str, header_only: bool = False) -> Dataset:
    try:
        # force: some writers leave out the preamble and file meta (decode.image_format lets
        # such .dcm files through).
        return pydicom.dcmread(stream, force=True, stop_before_pixels=header_only)
    except (CorruptImageError, MemoryError):
        raise
    except Exception as err:  # pydicom parsing untrusted bytes can raise almost anything
        if isinstance(stream, Inflating) and stream.overflow:  # pydicom re-raised our refusal
            raise ImageTooLarge(name, stream.overflow) from err
        reason = f"truncated or corrupt DICOM file: {first_line(err)}"
        raise CorruptImageError(name, reason) from err


def _stream(data: bytes, name: str) -> io.IOBase:
    """The file as dcmread should read it: as it is, or with its deflated data set inflated
    as it is read (`Inflating`)."""
    fp = io.BytesIO(data)
    try:
        preamble = read_preamble(fp, True)
        meta = _read_file_meta_info(fp)
        deflated = meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
    except MemoryError:
        raise
    except Exception as err:
        reason = f"truncated or corrupt DICOM file: {first_line(err)}"
        raise CorruptImageError(name, reason) from err
    if not deflated:
        fp.seek(0)
        return fp
    return Inflating(_inflated_meta(preamble, meta), memoryview(data)[fp.tell() :], name)


def _inflated_meta(preamble: bytes | None, meta: FileMetaDataset) -> bytes:
    """Preamble and file meta for the inflated data set: Explicit VR Little Endian."""
    meta = FileMetaDataset(meta)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    out.write((preamble or bytes(128)) + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=False)
    return out.getvalue()


class Inflating(io.RawIOBase):
    """A deflated DICOM file as dcmread reads one (PS3.5 A.5: everything after the file meta
    is deflated): `head` (preamble and file meta, `_inflated_meta`), then the data set,
    inflated only as far as it is read and never past `limit` bytes in all (zlib's
    max_length), so that a zip bomb never materialises."""

    def __init__(self, head: bytes, deflated: memoryview, name: str) -> None:
        super().__init__()
        self.limit = len(head) + MAX_HEADER_BYTES  # until the header says how much follows
        self.overflow = ""  # why reading stopped at the limit
        self._name = name
        self._data = bytearray(head)
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._pending: bytes | memoryview = deflated
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_END:
            self._inflate(None)
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position}.get(whence, len(self._data))
        self._position = max(base + offset, 0)
        return self._position

    def read(self, size: int | None = -1) -> bytes:
        end = None if size is None or size < 0 else self._position + size
        self._inflate(end)
        end = len(self._data) if end is None else min(end, len(self._data))
        with memoryview(self._data) as view:  # one copy, not RawIOBase's two
            chunk = bytes(view[self._position : end])
        self._position += len(chunk)
        return chunk

    def readinto(self, target) -> int:
        chunk = self.read(len(target))
        target[: len(chunk)] = chunk
        return len(chunk)

    def close(self) -> None:
        self._data = bytearray()  # the inflated data set is parsed: free it
        super().close()

    def _inflate(self, end: int | None) -> None:
        """Inflate until `end` bytes are at hand (None: all of it) or the stream ends."""
        while (end is None or len(self._data) < end) and self._pending:
            room = self.limit - len(self._data)
            if room <= 0:
                self.overflow = (
                    f"deflated DICOM data set inflates past {self.limit:,} bytes, more than "
                    f"its header allows"
                )
                raise ImageTooLarge(self._name, self.overflow)
            want = room if end is None else min(room, max(end - len(self._data), 1 << 16))
            self._data += self._inflater.decompress(self._pending, want)
            self._pending = self._inflater.unconsumed_tail
            if self._inflater.eof:
                break


def _check_header(ds: Dataset, name: str) -> int:
    """The bytes the pixel data decompresses to, once the header's geometry is checked: one
    grey frame of sensible size within the decode budget."""
    # pydicom reads a NumberOfFrames of 0 as 1, as files that say 0 mean.
    frames = _whole(ds, "NumberOfFrames", name, default=1, least=0) or 1
    if frames > MAX_FRAMES:  # which frame is the radiograph is not ours to guess
        raise CorruptImageError(
            name, f"multi-frame DICOM ({frames} frames), expected one radiograph"
        )
    samples = _whole(ds, "SamplesPerPixel", name, default=1)
    photometric = str(ds.get("PhotometricInterpretation") or "no PhotometricInterpretation")
    if samples != 1 or photometric not in GREY:
        raise CorruptImageError(
            name,
            f"not a grey-scale DICOM ({photometric}, {samples} samples per pixel): "
            f"expected MONOCHROME1 or MONOCHROME2",
        )
    rows, columns = _whole(ds, "Rows", name), _whole(ds, "Columns", name)
    bits = _whole(ds, "BitsAllocated", name)
    if bits not in BITS_ALLOCATED:
        raise CorruptImageError(name, f"BitsAllocated {bits}, expected 1, 8, 16, 32 or 64")
    if reason := over_pixels(columns, rows):
        raise ImageTooLarge(name, reason)
    pixel_bytes = (rows * columns * bits + 7) // 8
    if reason := over_bytes("pixel data", pixel_bytes, MAX_PIXEL_BYTES):
        raise ImageTooLarge(name, reason)
    return pixel_bytes


def _whole(ds: Dataset, keyword: str, name: str, default: int | None = None, least=1) -> int:
    """A one-number element as an int of at least `least`; `default` when it is absent or
    empty (refused when there is no default)."""
    value = ds.get(keyword)
    if value is None or value == "":
        if default is None:
            raise CorruptImageError(name, f"DICOM file without {keyword}")
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise CorruptImageError(name, f"{keyword} {_shown(value)} is not a whole number") from None
    if number < least:
        raise CorruptImageError(name, f"{keyword} {number}, expected at least {least}")
    return number


def _real(ds: Dataset, keyword: str, name: str) -> float | None:
    """The first value of a decimal element as a finite float; None when absent or empty."""
    value = ds.get(keyword)
    if isinstance(value, MultiValue | list | tuple):
        value = value[0] if len(value) else None
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise CorruptImageError(name, f"{keyword} {_shown(value)} is not a number") from None
    if not math.isfinite(number):
        raise CorruptImageError(name, f"{keyword} {number} is not a finite number")
    return number


def _shown(value) -> str:
    """A header value in a message: quoted, and short."""
    return repr(str(value)[:40])


def _check_modality(ds: Dataset, name: str) -> None:
    """The modality LUT or rescale pydicom's apply_modality_lut will read: a LUT of 8- or
    16-bit entries (its dtypes), or a rescale of finite numbers that does not map every pixel
    to one value."""
    if ds.get("ModalityLUTSequence"):
        item = ds.ModalityLUTSequence[0]
        bits = _lut_descriptor(item, "modality LUT", name)[2]
        if bits not in (8, 16):
            raise CorruptImageError(name, f"modality LUT of {bits}-bit entries, expected 8 or 16")
        if item.get("LUTData") is None or not len(item.LUTData):
            raise CorruptImageError(name, "modality LUT without data")
    elif "RescaleSlope" in ds and "RescaleIntercept" in ds:
        slope, intercept = _real(ds, "RescaleSlope", name), _real(ds, "RescaleIntercept", name)
        if slope is None or intercept is None:
            raise CorruptImageError(name, "RescaleSlope or RescaleIntercept without a value")
        if slope == 0:
            raise CorruptImageError(name, "RescaleSlope 0 maps every pixel to one value")


def _lut_descriptor(item: Dataset, what: str, name: str) -> tuple[int, int, int]:
    """A LUT's descriptor (PS3.3 C.11.1.1): entries (0: 2^16), first value mapped, bits."""
    descriptor = item.get("LUTDescriptor")
    if descriptor is None:
        raise CorruptImageError(name, f"{what} without LUTDescriptor")
    values = list(descriptor) if isinstance(descriptor, MultiValue | list | tuple) else [descriptor]
    if len(values) != 3:
        raise CorruptImageError(name, f"{what} descriptor of {len(values)} values, expected 3")
    try:
        entries, first, bits = (int(v) for v in values)
    except (TypeError, ValueError):
        raise CorruptImageError(name, f"{what} descriptor {values} is not three numbers") from None
    return entries, first, bits


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
    if syntax.is_compressed:
        _check_frame_size(ds, syntax, name)
    try:
        stored = ds.pixel_array
    except MemoryError:
        raise
    except Exception as err:  # handlers report bad data with assorted exception types
        why = _handler_reason(err)
        if syntax.is_compressed:
            reason = f"cannot decode its {_syntax_name(syntax)} pixel data: {why}; it is "
            reason += "corrupt or needs pylibjpeg[all]"
        else:
            reason = f"truncated or corrupt pixel data: {why}"
        raise CorruptImageError(name, reason) from err
    if stored.shape != (ds.Rows, ds.Columns):
        raise CorruptImageError(name, f"pixel data of shape {stored.shape}, expected one frame")
    return stored


def _check_frame_size(ds: Dataset, syntax: UID, name: str) -> None:
    """Compressed pixel data whose own header declares another size than Rows x Columns is
    refused before a handler decodes it: handlers allocate what the codestream says, so a
    64 x 64 header over a 13000 x 13000 JPEG would slip past the budget."""
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        size = codestream_size(frame)
    except (StopIteration, ValueError) as err:  # HeaderError is a ValueError
        why = first_line(err, 80) if str(err) else "no frame"
        reason = f"cannot decode its {_syntax_name(syntax)} pixel data: {why}; it is corrupt"
        raise CorruptImageError(name, reason) from err
    if size is not None and size != (ds.Columns, ds.Rows):
        raise CorruptImageError(
            name,
            f"its compressed image is {size[0]} x {size[1]} pixels, but its header says "
            f"{ds.Columns} x {ds.Rows}",
        )


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


def _display(stored: np.ndarray, ds: Dataset, voi: Voi, name: str) -> np.ndarray:
    """Stored values [H, W] -> display grey uint8 [H, W], CHUNK_PIXELS at a time. A header
    that shows a non-constant image as one grey level is refused: the image is lost to it."""
    step = max(1, CHUNK_PIXELS // stored.shape[1])
    chunks = [slice(row, row + step) for row in range(0, stored.shape[0], step)]
    low = high = 0.0
    if voi.stretches:  # the image's own min..max
        ranges = [_range(_modality(stored[rows], ds, name)) for rows in chunks]
        low, high = min(r[0] for r in ranges), max(r[1] for r in ranges)
    grey = np.empty(stored.shape, np.uint8)
    for rows in chunks:
        values = voi.apply(_modality(stored[rows], ds, name), low, high)
        grey[rows] = np.floor(values * 255 + 0.5).clip(0, 255)
    if grey.min() == grey.max() and stored.min() != stored.max():
        raise CorruptImageError(name, _flattened_by(stored, ds, voi, chunks, name))
    return grey


def _modality(stored: np.ndarray, ds: Dataset, name: str) -> np.ndarray:
    """Stored values -> modality values (float64), by the modality LUT or rescale."""
    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    if not np.isfinite(values).all():
        reason = "RescaleSlope and RescaleIntercept take pixel values past the largest number"
        raise CorruptImageError(name, reason)
    return values


def _range(values: np.ndarray) -> tuple[float, float]:
    return float(values.min()), float(values.max())


def _flattened_by(stored: np.ndarray, ds: Dataset, voi: Voi, chunks: list, name: str) -> str:
    """Which header value made one grey level of a non-constant image."""
    ranges = [_range(_modality(stored[rows], ds, name)) for rows in chunks]
    if min(r[0] for r in ranges) == max(r[1] for r in ranges):
        return "its modality LUT maps every stored pixel value to one value"
    return f"its {voi.describe()} shows every pixel as one grey level"


@dataclass(frozen=True)
class Voi:
    """How modality values become display grey 0..1 (PS3.3 C.11.2): the first VOI LUT, else
    the first usable window, else the image's own min..max (what viewers show when the file
    suggests nothing)."""

    lut: np.ndarray | None = None  # the LUT's entries scaled from its declared bits to 0..1
    first: int = 0  # the first modality value the LUT maps
    window: tuple[float, float, str] | None = None  # centre, width, VOI LUT Function

    @classmethod
    def of(cls, ds: Dataset, name: str) -> Voi:
        if ds.get("VOILUTSequence"):
            return cls(*_voi_lut(ds, name))
        return cls(window=_window(ds, name))

    @property
    def stretches(self) -> bool:
        return self.lut is None and self.window is None

    def apply(self, values: np.ndarray, low: float, high: float) -> np.ndarray:
        """Modality values -> display grey 0..1; `low`, `high`: the image's own range."""
        if self.lut is not None:
            index = np.clip(np.rint(values) - self.first, 0, self.lut.size - 1).astype(np.intp)
            return self.lut[index]
        if self.window is not None:
            return _windowed(values, *self.window)
        if high == low:  # a blank image: nothing to stretch
            return np.zeros_like(values)
        return (values - low) / (high - low)

    def describe(self) -> str:
        if self.lut is not None:
            return "VOI LUT"
        if self.window is not None:
            return f"window (centre {self.window[0]:g}, width {self.window[1]:g})"
        return "grey range"


def _voi_lut(ds: Dataset, name: str) -> tuple[np.ndarray, int]:
    """The first VOI LUT (PS3.3 C.11.2.1.1), its output scaled from its declared bits to 0..1,
    and the first value it maps. Not pydicom's apply_voi: it indexes through an array of the
    LUT's entry type, so the indices of an 8-bit LUT with more than 256 entries wrap around
    (pydicom 3.0)."""
    item = ds.VOILUTSequence[0]
    entries, first, bits = _lut_descriptor(item, "VOI LUT", name)
    if not 8 <= bits <= 16:  # 10-16 in today's standard, 8 in earlier editions
        raise CorruptImageError(name, f"VOI LUT of {bits}-bit entries, expected 8 to 16")
    lut = item.get("LUTData")
    if lut is None or not len(lut):
        raise CorruptImageError(name, "VOI LUT without data")
    if isinstance(lut, bytes):  # OW (always so in implicit-VR files): 16-bit words, file order
        if len(lut) % 2:
            raise CorruptImageError(name, "VOI LUT data of an odd number of bytes")
        lut = np.frombuffer(lut, dtype="<u2" if ds.original_encoding[1] is not False else ">u2")
    lut = np.atleast_1d(np.asarray(lut, dtype=np.float64))
    last = min(entries or 2**16, lut.size)  # entries 0 means 2^16 (PS3.3 C.11.2.1.1.1)
    # Values below the first mapped one take the first entry, values past the end the last.
    return lut[:last] / (2**bits - 1), first


def _window(ds: Dataset, name: str) -> tuple[float, float, str] | None:
    """The first Window Center/Width and the VOI LUT Function (PS3.3 C.11.2.1.2), or None
    where there is none or its width is one the standard forbids. A value that is not a finite
    number is refused: the window would make every pixel one grey level."""
    center, width = _real(ds, "WindowCenter", name), _real(ds, "WindowWidth", name)
    if center is None or width is None:
        return None
    function = str(ds.get("VOILUTFunction") or "LINEAR").upper()
    if function in ("SIGMOID", "LINEAR_EXACT"):
        return (center, width, function) if width > 0 else None
    # LINEAR (the default, and for functions we do not know)
    return (center, width, "LINEAR") if width >= 1 else None


def _windowed(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """Modality values through a window, output 0..1."""
    if function == "SIGMOID":
        with np.errstate(over="ignore"):  # exp overflows to inf far below the centre: 0 out
            return 1 / (1 + np.exp(-4 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0, 1)
    if width == 1:  # the ramp below has no width left: a threshold
        return (values > center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
