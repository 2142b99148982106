"""What a JPEG, PNG, GIF or WebP file promises before it is decoded: its format, its size and
its number of frames, read from the header alone (not a pixel is decompressed), so that the
decode budget (`pneumonia.data.budget`) holds before a decoder allocates anything."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# SOF markers (a frame header: precision, height, width); C4, C8 and CC are other segments.
# SOF0-15 but DHT, JPG and DAC, and JPEG-LS's SOF55 (same layout: P, Y, X).
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}
# Markers without a length: TEM and the restart markers.
_STANDALONE = {0x01, *range(0xD0, 0xD8)}


class HeaderError(ValueError):
    """A header that ends early or breaks its format's rules."""


@dataclass(frozen=True)
class Header:
    """An image's format, the largest canvas a decoder would allocate for one of its frames,
    and its frames (an animation's, counted without decoding them)."""

    format: str  # jpeg, png, gif, webp
    width: int
    height: int
    frames: int = 1


def raster_format(data: bytes) -> str | None:
    """jpeg, png, gif or webp by the file's magic number (as torchvision tells them apart), or
    None."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:4] == b"\x89PNG":
        return "png"
    if data[:4] == b"GIF8":
        return "gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def read_header(data: bytes) -> Header | None:
    """The header of a JPEG, PNG, GIF or WebP file (None for another format); HeaderError when
    it is truncated or malformed."""
    kind = raster_format(data)
    if kind is None:
        return None
    try:
        return {"jpeg": _jpeg, "png": _png, "gif": _gif, "webp": _webp}[kind](data)
    except IndexError:  # a field past the end of the data
        raise HeaderError(f"{kind} header ends early") from None


def codestream_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) a compressed DICOM frame's own header declares: a JPEG (baseline to
    lossless, JPEG-LS) or JPEG 2000 codestream (HTJ2K too, in a JP2 box or bare); None for
    another kind. HeaderError when it is truncated or malformed."""
    try:
        if data[:2] == b"\xff\xd8":
            header = _jpeg(data)
            return header.width, header.height
        siz = data.find(b"\xff\x4f\xff\x51", 0, 4096)  # SOC then SIZ (ITU-T T.800 A.5.1)
        if siz < 0:
            return None
        at = siz + 8  # SIZ: Lsiz, Rsiz, then Xsiz, Ysiz, XOsiz, YOsiz (4 bytes each)
        grid = [_u32(data, at + 4 * k, "big") for k in range(4)]
        return grid[0] - grid[2], grid[1] - grid[3]
    except IndexError:
        raise HeaderError("compressed frame header ends early") from None


def _u16(data: bytes, at: int, order: Literal["little", "big"] = "little") -> int:
    if at + 2 > len(data):
        raise IndexError(at)
    return int.from_bytes(data[at : at + 2], order)


def _u24(data: bytes, at: int) -> int:
    if at + 3 > len(data):
        raise IndexError(at)
    return int.from_bytes(data[at : at + 3], "little")


def _u32(data: bytes, at: int, order: Literal["little", "big"] = "little") -> int:
    if at + 4 > len(data):
        raise IndexError(at)
    return int.from_bytes(data[at : at + 4], order)


def _png(data: bytes) -> Header:
    """IHDR comes first (PNG spec 5.6); libpng decodes the first frame of an APNG only."""
    if data[12:16] != b"IHDR":
        raise HeaderError("PNG without IHDR first")
    return Header("png", _u32(data, 16, "big"), _u32(data, 20, "big"))


def _jpeg(data: bytes) -> Header:
    """The first frame header (SOFn), found by walking the segments after SOI."""
    at = 2
    while True:
        if data[at] != 0xFF:  # libjpeg skips stray bytes before a marker ("extraneous bytes")
            at = data.find(b"\xff", at)
            if at < 0:
                raise IndexError("no marker after stray bytes")
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
        elif marker in _STANDALONE:
            at += 2
        elif marker in _SOF:
            return Header("jpeg", _u16(data, at + 7, "big"), _u16(data, at + 5, "big"))
        elif marker in (0xD9, 0xDA):  # end of image, start of scan
            raise HeaderError("JPEG scan before its frame header")
        else:
            at += 2 + _u16(data, at + 2, "big")


def _gif(data: bytes) -> Header:
    """The logical screen and every image descriptor (a frame may be larger than the screen:
    giflib allocates it whole), walking the blocks without decompressing them."""
    width, height = _u16(data, 6), _u16(data, 8)
    at = 13 + _colour_table(data[10])
    frames = 0
    while at < len(data) and data[at] != 0x3B:  # the trailer
        if data[at] == 0x21:  # an extension: label, then sub-blocks
            at = _skip_sub_blocks(data, at + 2)
        elif data[at] == 0x2C:  # an image descriptor
            frames += 1
            width, height = max(width, _u16(data, at + 5)), max(height, _u16(data, at + 7))
            at = _skip_sub_blocks(data, at + 11 + _colour_table(data[at + 9]))
        else:
            raise HeaderError("GIF block of unknown type")
    return Header("gif", width, height, frames)


def _colour_table(flags: int) -> int:
    """The size of the colour table a GIF screen or image descriptor's flags announce."""
    return 3 << ((flags & 7) + 1) if flags & 0x80 else 0


def _skip_sub_blocks(data: bytes, at: int) -> int:
    while data[at]:
        at += 1 + data[at]
    return at + 1


def _webp(data: bytes) -> Header:
    """The canvas of a lossy (VP8), lossless (VP8L) or extended (VP8X) WebP; an extended one's
    frames are its ANMF chunks."""
    chunk = data[12:16]
    if chunk == b"VP8 ":
        return Header("webp", _u16(data, 26) & 0x3FFF, _u16(data, 28) & 0x3FFF)
    if chunk == b"VP8L":
        bits = _u32(data, 21)
        return Header("webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8X":
        width, height = _u24(data, 24) + 1, _u24(data, 27) + 1
        return Header("webp", width, height, max(_chunks(data, b"ANMF"), 1))
    raise HeaderError("WebP without a VP8, VP8L or VP8X chunk")


def _chunks(data: bytes, fourcc: bytes) -> int:
    """How many RIFF chunks of this type a WebP file holds."""
    count, at = 0, 12
    while at + 8 <= len(data):
        count += data[at : at + 4] == fourcc
        at += 8 + _u32(data, at + 4) + (_u32(data, at + 4) & 1)
    return count
