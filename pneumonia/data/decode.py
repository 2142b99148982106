"""Decode image files once into 1-channel uint8 tensors of one size."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from pneumonia.core.errors import UserError
from pneumonia.data.budget import (
    MAX_FILE_BYTES,
    MAX_FRAMES,
    not_regular,
    over_bytes,
    over_pixels,
)
from pneumonia.data.corrupt import CorruptImageError, ImageTooLarge  # raised here and by dicom
from pneumonia.data.headers import HeaderError, raster_format, read_header
from pneumonia.data.imageset import ImageSet
from pneumonia.data.intensity import standardize
from pneumonia.data.kermany import ImageFile
from pneumonia.data.lungs import crop_to_lungs

# Pixels converted to grey uint8 at a time (`_grey_uint8`).
CONVERT_PIXELS = 1 << 20


def corrupt_image_error(path: str, reason: str = "") -> UserError:
    """The one-line error for an unreadable image file."""
    why = f" ({reason})" if reason else ""
    return UserError(
        f"cannot decode image {path}{why}: remove it, or set data.skip_corrupt true to skip "
        f"such files"
    )


def image_format(data: bytes, name: str = "") -> str | None:
    """dicom, jpeg, png, gif or webp by the file's content, or None. DICOM's "DICM" mark after
    the 128-byte preamble first; a .dcm name counts only when the bytes carry no other known
    magic (some writers leave the preamble out, and a PNG named .dcm is still a PNG)."""
    if data[128:132] == b"DICM":
        return "dicom"
    kind = raster_format(data)
    if kind is None and name.lower().endswith((".dcm", ".dicom")):
        return "dicom"
    return kind


def is_dicom(data: bytes, name: str = "") -> bool:
    """A DICOM file, by `image_format`."""
    return image_format(data, name) == "dicom"


def decode_bytes(data: bytes, name: str) -> torch.Tensor:
    """An image file's bytes (`name` says where they came from) -> uint8 [1, H, W] at its own
    size: JPEG, PNG, GIF and WebP by torchvision, DICOM by pydicom (`pneumonia.data.dicom`).
    The decode budget (`pneumonia.data.budget`) is checked from the header first.
    Raises CorruptImageError(name, why), ImageTooLarge for an image over the budget."""
    if reason := over_bytes("file", len(data), MAX_FILE_BYTES):
        raise ImageTooLarge(name, reason)
    kind = image_format(data, name)
    if kind == "dicom":
        from pneumonia.data.dicom import decode_dicom  # pydicom loads only for DICOM inputs

        return decode_dicom(data, name)
    if not data:
        raise CorruptImageError(name, "empty file")
    if kind is None:
        raise CorruptImageError(name, "not a JPEG, PNG, GIF, WebP or DICOM file")
    _check_header(data, name)
    try:
        image = decode_image(
            torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.GRAY
        )
    except (RuntimeError, ValueError) as err:
        raise CorruptImageError(name, _decoder_reason(err)) from err
    return _grey_uint8(image, name)


def _check_header(data: bytes, name: str) -> None:
    """Refuse a raster image over the decode budget, or of more than one frame, before a
    decoder allocates its pixels."""
    try:
        header = read_header(data)
    except HeaderError as err:
        raise CorruptImageError(name, "truncated or corrupt image data") from err
    assert header is not None  # decode_bytes checks JPEG, PNG, GIF and WebP files only
    if header.frames > MAX_FRAMES:
        raise CorruptImageError(name, f"{header.frames} frames, expected one image")
    if reason := over_pixels(header.width, header.height):
        raise ImageTooLarge(name, reason)


def _decoder_reason(err: Exception) -> str:
    """Why a decoder refused a file, in a few words where torchvision says something useful."""
    text = str(err).lower()
    if "unknown image" in text or "unsupported" in text or "not recognized" in text:
        return "not a JPEG, PNG, GIF, WebP or DICOM file"
    if "premature" in text or "truncated" in text or "corrupt" in text or "invalid" in text:
        return "truncated or corrupt image data"
    return ""


def _grey_uint8(image: torch.Tensor, name: str) -> torch.Tensor:
    """A decoder's output as one grey uint8 frame [1, H, W]. Multi-frame files are refused:
    which frame is the radiograph is not ours to guess."""
    if image.ndim == 4:  # GIF (and other animations) decode frame by frame
        if image.shape[0] != 1:
            raise CorruptImageError(name, f"{image.shape[0]} frames, expected one image")
        image = image[0]
    if image.shape[0] == 2:  # grey + alpha
        image = image[:1]
    if image.shape[0] == 1 and image.dtype == torch.uint8:
        return image
    # GIF and WebP ignore the grey mode and come back as RGB, 16-bit PNGs as uint16: converted
    # a band of rows at a time, whose float temporaries then take a few MB, not several bytes
    # a pixel (hundreds of MB for an image at the pixel limit).
    grey = torch.empty((1, *image.shape[-2:]), dtype=torch.uint8)
    step = max(1, CONVERT_PIXELS // image.shape[-1])
    for row in range(0, image.shape[-2], step):
        grey[:, row : row + step] = _to_grey(image[:, row : row + step])
    return grey


def _to_grey(image: torch.Tensor) -> torch.Tensor:
    if image.shape[0] in (3, 4):
        image = TF.rgb_to_grayscale(image[:3])
    if image.dtype != torch.uint8:  # 16-bit: rescale to 0..255
        image = TF.to_dtype(image, torch.uint8, scale=True)
    return image


def read_image(path: str | Path) -> torch.Tensor:
    """An image file -> uint8 [1, H, W] at its own size (see `decode_bytes`)."""
    return decode_bytes(read_regular(path), str(path))


def read_regular(path: str | Path, head: int | None = None) -> bytes:
    """A file's bytes (its first `head` bytes only, with `head`), or CorruptImageError: a file
    that is not a regular one once links are followed (a named pipe would block the reader, a
    device never end) is refused from its stat, unopened, as is one over the byte budget."""
    name = str(path)
    try:
        _check_file(name, os.stat(path), head)
        # O_NONBLOCK: should the path have become a named pipe since, opening it cannot block;
        # the fstat then refuses what was opened.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        with open(fd, "rb") as f:
            size = _check_file(name, os.fstat(fd), head)
            # As much as fstat says (a file still being written is read as it was then).
            return f.read(size if head is None else head)
    except OSError as err:
        raise CorruptImageError(name, err.strerror or type(err).__name__) from err


def _check_file(name: str, status: os.stat_result, head: int | None) -> int:
    """A regular file's size; CorruptImageError for any other kind, ImageTooLarge for a whole
    file over the byte budget."""
    if reason := not_regular(status.st_mode):
        raise CorruptImageError(name, reason)
    if head is None and (reason := over_bytes("file", status.st_size, MAX_FILE_BYTES)):
        raise ImageTooLarge(name, reason)
    return status.st_size


def square(image: torch.Tensor, image_size: int) -> torch.Tensor:
    """[C, H, W] -> [C, image_size, image_size]. Kermany originals vary in aspect ratio; the
    paper squashes them to a square, so do we."""
    return TF.resize(image, [image_size, image_size], antialias=True)


def prepare(
    image: torch.Tensor, image_size: int, roi: str = "full", intensity: str = "none"
) -> tuple[torch.Tensor, bool]:
    """A decoded image [1, H, W] -> what a model sees, uint8 [1, S, S]: the whole image
    (`roi` full) or its lung field's box (lungs: `pneumonia.data.lungs`), squashed to a
    square, its grey levels standardised by `intensity` (`pneumonia.data.intensity`); and
    whether the lung field was found (always True for full)."""
    image, found = crop_to_roi(image, roi)
    return to_input(image, image_size, intensity), found


def to_input(view: torch.Tensor, image_size: int, intensity: str = "none") -> torch.Tensor:
    """The region a model sees [1, H, W] (`crop_to_roi`) -> its input [1, S, S]: squashed to
    a square, then standardised (at the model's size: cheap, and the same whatever the
    original size)."""
    return standardize(square(view, image_size), intensity)


def crop_to_roi(image: torch.Tensor, roi: str) -> tuple[torch.Tensor, bool]:
    """[1, H, W] -> the region a model of `roi` sees, before resizing; and whether the lung
    field was found (lungs; always True for full)."""
    return crop_to_lungs(image) if roi == "lungs" else (image, True)


def decode_file(
    path: str | Path, image_size: int, roi: str = "full", intensity: str = "none"
) -> torch.Tensor:
    """A grey-scale, palette or colour JPEG/PNG/GIF/WebP, or a DICOM radiograph, of any size
    -> uint8 [1, image_size, image_size] (of its lung field with `roi` lungs, standardised by
    `intensity`)."""
    return prepare(read_image(path), image_size, roi, intensity)[0]


def decode_files(
    files: list[ImageFile],
    image_size: int,
    skip_corrupt: bool = False,
    desc: str = "decode",
    roi: str = "full",
    intensity: str = "none",
) -> tuple[ImageSet, list[str], list[str]]:
    """Decode every file (threads: the decoders release the GIL) into an ImageSet.

    A corrupt file stops with an error naming it, or with `skip_corrupt` is left out;
    the second value lists the files left out, the third (`roi` lungs) the images whose lung
    field was implausible and which were kept whole.
    """
    images: list[torch.Tensor | None] = [None] * len(files)
    skipped: list[str] = []
    whole: list[str] = []

    def work(i: int) -> None:
        try:
            images[i], found = prepare(read_image(files[i].path), image_size, roi, intensity)
            if not found:
                whole.append(files[i].path.name)
        except CorruptImageError:
            if not skip_corrupt:
                raise
            skipped.append(str(files[i].path))

    with ThreadPoolExecutor(max_workers=max(torch.get_num_threads(), 1)) as pool:
        try:
            for _ in tqdm(
                pool.map(work, range(len(files))),
                total=len(files),
                desc=desc,
                unit="img",
                leave=False,
            ):
                pass
        except CorruptImageError as err:
            raise corrupt_image_error(*err.args) from None
    keep = [i for i, image in enumerate(images) if image is not None]
    if not keep:
        raise UserError(f"no readable image among {len(files)} files, e.g. {files[0].path}")
    imageset = ImageSet(
        images=torch.stack([image for image in images if image is not None]),  # those of keep
        labels=torch.tensor([files[i].label for i in keep], dtype=torch.long),
        patients=[files[i].patient for i in keep],
        names=[files[i].path.name for i in keep],
    )
    return imageset, sorted(skipped), sorted(whole)
