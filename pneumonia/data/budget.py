"""The decode budget: how much a decoder may be made to materialise for one input, checked from
the file's stat and its header before any pixel is decoded; the same for training, evaluation,
predict and serve. And what may be read at all: regular files only (a named pipe blocks the
reader, a device such as /dev/zero never ends).

The limits are far above any radiograph: flat-panel chest detectors have up to about
4300 x 4300 pixels (18.5 MP), full-field mammography 4096 x 5625 (23 MP), so 8192 x 8192
(67 MP) leaves about three times the largest. Decoding an image at the limit raises the
resident memory (ru_maxrss over the interpreter's; torchvision 0.29, pydicom 3.0) by about
65-80 MiB for an 8-bit PNG or JPEG, 200-300 MiB for a 16-bit PNG, a GIF or a colour WebP
(converted to grey a band of rows at a time), 260 MiB for a deflated 16-bit DICOM and
380 MiB for an uncompressed one (its 128 MiB file included; 1.9 GB before the display
pipeline went by bands of rows). A bomb (an 875 KB PNG of 30000 x 30000 pixels, a 280 KB
deflated DICOM of 12000 x 12000) is refused from its header in milliseconds, before it
inflates: it took 5 GB and half a minute to decode.
"""

from __future__ import annotations

import stat

LIMIT_SIDE = 8192
MAX_PIXELS = LIMIT_SIDE * LIMIT_SIDE
# One image per file: which frame of a multi-frame file is the radiograph is not ours to guess,
# and a decoder that met more (an animated GIF) would decode every one of them.
MAX_FRAMES = 1
# What the pixel data of an image may decompress to: 16 bits a pixel at the pixel limit.
MAX_PIXEL_BYTES = 2 * MAX_PIXELS
# A file on disk or an upload: an uncompressed 16-bit DICOM at the pixel limit is 128 MiB.
MAX_FILE_BYTES = 256 << 20
# A deflated DICOM's elements before its pixel data (its header) inflate to at most this.
MAX_HEADER_BYTES = 16 << 20

_KINDS = {
    stat.S_IFIFO: "a named pipe",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a folder",
}


def not_regular(mode: int) -> str | None:
    """Why a file of this st_mode (after links are followed) is never read, or None for a
    regular file."""
    if stat.S_ISREG(mode):
        return None
    return f"not a regular file ({_KINDS.get(stat.S_IFMT(mode), 'a special file')})"


def over_pixels(width: int, height: int) -> str | None:
    """Why an image of this size is refused, or None when it is within the budget."""
    if width * height <= MAX_PIXELS:
        return None
    return (
        f"{width} x {height} pixels, over the decode limit of {MAX_PIXELS:,} "
        f"({LIMIT_SIDE} x {LIMIT_SIDE})"
    )


def over_bytes(what: str, size: int, limit: int) -> str | None:
    """Why `what` of `size` bytes is refused, or None when it is within `limit`."""
    if size <= limit:
        return None
    return f"{what} of {size:,} bytes, over the limit of {limit:,}"
