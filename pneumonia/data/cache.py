"""A file cache of decoded images, so each image is decoded once across epochs and runs.

The cache lives outside the data folder (the data folder is read-only input). Its key covers
the file list with sizes and modification times, the image size and the decoder version, so
any change to the data gives a new file instead of stale tensors.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import cast

from pneumonia.core.errors import UserError
from pneumonia.core.files import save_atomic
from pneumonia.core.safeload import safe_load
from pneumonia.data.decode import corrupt_image_error, decode_files
from pneumonia.data.imageset import ImageSet
from pneumonia.data.intensity import standardize
from pneumonia.data.kermany import ImageFile

log = logging.getLogger(__name__)

CACHE_VERSION = 3  # bump when decoding changes, to orphan old cache files (3: a PNG named
# .dcm read by its content, a header that turns an image into one grey level refused)


def cache_key(
    files: list[ImageFile], image_size: int, roi: str = "full", intensity: str = "none"
) -> str:
    """A digest of what the decoded tensors depend on."""
    region = "" if roi == "full" else f"|{roi}"  # full: the keys of earlier caches still hold
    levels = "" if intensity == "none" else f"|{intensity}"  # none: likewise
    digest = hashlib.sha256(f"v{CACHE_VERSION}|{image_size}{region}{levels}".encode())
    # Resolving each folder once, not each file: 5,000 realpath calls cost half a second.
    folders: dict[Path, str] = {}
    for f in files:
        stat = f.path.stat()
        if f.path.parent not in folders:
            folders[f.path.parent] = os.path.realpath(f.path.parent)
        # The name's bytes, not its text: a name that is not UTF-8 holds undecodable bytes
        # (surrogate escapes) that str.encode refuses; the bytes of a UTF-8 name are its
        # encoding, so earlier keys still hold.
        path = os.fsencode(os.path.join(folders[f.path.parent], f.path.name))
        digest.update(b"|" + path + f"|{stat.st_size}|{stat.st_mtime_ns}|{f.label}".encode())
    return digest.hexdigest()[:24]


def cache_path(
    files: list[ImageFile], image_size: int, cache_dir: Path, roi="full", intensity="none"
) -> Path:
    """Where the decoded tensors of `files` at `image_size` are (or will be) kept."""
    region = "" if roi == "full" else f"{roi}-"
    levels = "" if intensity == "none" else f"{intensity}-"
    key = cache_key(files, image_size, roi, intensity)
    return Path(cache_dir) / f"images-{image_size}px-{region}{levels}{key}.pt"


def _to_payload(imageset: ImageSet, skipped: list[str], whole: list[str]) -> dict:
    return {
        "images": imageset.images,
        "labels": imageset.labels,
        "patients": imageset.patients,
        "names": imageset.names,
        "skipped": skipped,
        "whole": whole,
    }


def _from_payload(payload: dict) -> tuple[ImageSet, list[str], list[str]]:
    imageset = ImageSet(payload["images"], payload["labels"], payload["patients"], payload["names"])
    return imageset, payload["skipped"], payload.get("whole", [])


def load_or_decode(
    files: list[ImageFile],
    image_size: int,
    cache_dir: Path,
    skip_corrupt: bool = False,
    desc: str = "decode",
    roi: str = "full",
    intensity: str = "none",
) -> ImageSet:
    """The decoded images of `files` (of their lung fields with `roi` lungs, standardised by
    `intensity`): from the cache when present, else decoded and cached. With lungs, a line
    says how many were kept whole."""
    cached = _cached(files, image_size, cache_dir, skip_corrupt, desc, roi, intensity)
    imageset, skipped, whole = cached
    if roi == "lungs":
        log.info(
            f"data.roi lungs ({desc}): lung field cropped in {len(imageset) - len(whole)} of "
            f"{len(imageset)} images; {len(whole)} kept whole (implausible mask)"
        )
    if skipped and not skip_corrupt:
        # Cached by an earlier run that skipped files; without the option that is an error.
        raise corrupt_image_error(skipped[0])
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable file(s), e.g. {skipped[0]}", stacklevel=2)
    return imageset


def _cached(files, image_size, cache_dir, skip_corrupt, desc, roi, intensity):
    """(images, skipped, whole) of one option, from its cache file or made and cached. A
    standardised set is made from the un-standardised one (itself cached: re-imaging, the
    shift validation and site profiles, starts from it), as `prepare` would have made it."""
    path = cache_path(files, image_size, cache_dir, roi, intensity)
    cached = _read_cache(path)
    if cached is None:
        if intensity == "none":
            cached = decode_files(files, image_size, skip_corrupt, desc, roi)
        else:
            raw, skipped, whole = _cached(
                files, image_size, cache_dir, skip_corrupt, desc, roi, "none"
            )
            cached = replace(raw, images=standardize(raw.images, intensity)), skipped, whole
        save_atomic(_to_payload(*cached), path)
    return cached


def _read_cache(path: Path) -> tuple[ImageSet, list[str], list[str]] | None:
    if not path.is_file():
        return None
    try:
        # The one weights-only loader. What a file holds is known only by reading it: a
        # payload that is no dict of ours fails in _from_payload (below).
        return _from_payload(cast(dict, safe_load(path)))
    # safe_load refuses damaged or crafted bytes (UserError); a foreign payload raises a
    # TypeError or KeyError here. The cache is disposable: either way, decode again.
    except (UserError, TypeError, KeyError, ValueError):
        warnings.warn(f"ignoring unreadable cache file {path}; decoding again", stacklevel=2)
        return None
