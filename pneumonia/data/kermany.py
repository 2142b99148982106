"""The Kermany folder layout: class folders, optionally under train/ val/ test/ split folders.

Class folders are NORMAL/ and PNEUMONIA/ (Kermany's), or NORMAL/, BACTERIA/ and VIRUS/ (the
three-class layout); `folder_classes` says which a folder has."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pneumonia.core.errors import UserError
from pneumonia.data.imageset import CLASSES, THREE_CLASSES
from pneumonia.data.patients import patient_id

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ImageFile:
    """One image on disk with its class index and patient id."""

    path: Path
    label: int
    patient: str


def _class_dirs(folder: Path) -> dict[str, Path]:
    """Class name -> sub-folder, matched case-insensitively; only the known classes of the
    folder's layout (`folder_classes`)."""
    found = {p.name.upper(): p for p in folder.iterdir() if p.is_dir()}
    return {name: found[name] for name in folder_classes(folder, found) if name in found}


def folder_classes(folder: Path, found: dict | None = None) -> tuple[str, ...]:
    """THREE_CLASSES when `folder` has BACTERIA/ and VIRUS/ class folders, else CLASSES."""
    if found is None:
        found = {p.name.upper(): p for p in Path(folder).iterdir() if p.is_dir()}
    return THREE_CLASSES if {"BACTERIA", "VIRUS"} <= set(found) else CLASSES


def find_splits(root: str | Path) -> dict[str, Path]:
    """Split name -> folder holding the class folders.

    A root with class folders is one split, "train"; a root with train/ (and val/, test/)
    split folders gives each of them.
    """
    root = Path(root)
    if not root.exists():
        raise UserError(f"data root {root} does not exist: pass --data.root DIR with class folders")
    if not root.is_dir():
        raise UserError(f"data root {root} is a file: pass --data.root DIR with class folders")
    splits = {s: root / s for s in SPLITS if (root / s).is_dir() and _class_dirs(root / s)}
    if splits:
        if "train" not in splits:
            raise UserError(f"data root {root} has split folders but no train/ with class folders")
        return splits
    if _class_dirs(root):
        return {"train": root}
    raise UserError(
        f"data root {root} has no class folders: expected {'/ '.join(CLASSES)}/ "
        f"(or train/ val/ test/ holding them)"
    )


def find_sites(root: str | Path) -> dict[str, Path]:
    """Site name -> folder, for a root with one sub-folder per hospital, each laid out as
    `find_splits` expects (class folders, or train/ val/ test/ holding them)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data root {root} is not a folder: pass --data.root DIR of site folders")
    if _class_dirs(root) or any(_class_dirs(root / s) for s in SPLITS if (root / s).is_dir()):
        raise UserError(
            f"data root {root} holds class folders, not site folders: federated.partition sites "
            f"expects {root}/<hospital>/NORMAL/ and PNEUMONIA/"
        )
    sites = {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")}
    if not sites:
        raise UserError(
            f"data root {root} has no site folders: federated.partition sites expects "
            f"{root}/<hospital>/NORMAL/ and PNEUMONIA/"
        )
    for folder in sites.values():
        find_splits(folder)  # names the site folder that lacks class folders
    return sites


def list_image_files(folder: str | Path) -> list[ImageFile]:
    """Every image under the class folders of `folder`, sorted by class then name.

    Hidden files (.DS_Store and the like) are ignored; every other file is taken as an image,
    so a stray non-image file is reported when it is decoded rather than silently skipped;
    so is a named pipe or a device, which the decoder refuses unopened.
    """
    folder = Path(folder)
    dirs = _class_dirs(folder)
    classes = folder_classes(folder)
    missing = [c for c in classes if c not in dirs]
    if missing:
        raise UserError(f"{folder} lacks class folder(s) {', '.join(missing)}/: add them")
    files = []
    for label, name in enumerate(classes):
        # scandir's entries know their type without a stat call per file, and sorting names
        # (not Paths) keeps listing 5,000 files well under a second.
        with os.scandir(dirs[name]) as entries:
            names = sorted(e.name for e in entries if _listed(e) and not e.name.startswith("."))
        paths = [dirs[name] / n for n in names]
        if not paths:
            raise UserError(f"class folder {dirs[name]} is empty: add images or remove the folder")
        files += [ImageFile(p, label, patient_id(p.name)) for p in paths]
    return files


def _listed(entry: os.DirEntry) -> bool:
    """Every entry but folders and links that lead nowhere: a regular file by its type alone,
    a special file (named pipe, device) after a stat, so that decoding names it."""
    if entry.is_file() or entry.is_dir():
        return entry.is_file()
    try:
        entry.stat()
    except OSError:
        return False
    return True
