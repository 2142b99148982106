"""The classification task: NORMAL vs PNEUMONIA (binary), or NORMAL, BACTERIA, VIRUS.

Kermany's file names say each pneumonia's cause (`person1000_bacteria_2931.jpeg`,
`person447_virus_921_1.jpeg`); a folder laid out as NORMAL/ BACTERIA/ VIRUS/ says it by
folder. `for_task` turns either into the labels a task needs: the three-class labels merge
back into PNEUMONIA for the binary task, and the binary labels split by name for three classes.

The synthetic images have no cause: for three classes each synthetic pneumonia patient is
drawn BACTERIA or VIRUS (seeded, in Kermany's training proportions), with nothing in the
image to tell them apart, so a model can do no better than chance between the two there.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import PurePath
from typing import Literal, get_args

import torch

from pneumonia.core.errors import UserError
from pneumonia.data.imageset import CLASSES, NEGATIVE_CLASS, THREE_CLASSES, ImageSet

Task = Literal["binary", "three_class"]  # data.task's type: the parser checks it
TASKS: tuple[str, ...] = get_args(Task)
_CAUSE = re.compile(r"(?:^|_)(bacteria|virus)(?:_|$)", re.IGNORECASE)
# Kermany's training images: 2,530 bacterial and 1,345 viral pneumonias.
SYNTHETIC_BACTERIA_FRACTION = 0.65


def cause_of(name: str) -> str | None:
    """BACTERIA or VIRUS from a Kermany file name, or None when the name says neither."""
    match = _CAUSE.search(PurePath(name).stem)
    return match.group(1).upper() if match else None


def task_classes(task: str) -> tuple[str, ...]:
    return THREE_CLASSES if task == "three_class" else CLASSES


def for_task(images: ImageSet, task: str, seed: int = 0, synthetic: bool = False) -> ImageSet:
    """`images` labelled for `task` ("binary" or "three_class")."""
    if images.classes == task_classes(task):
        return images
    if task == "binary":
        merged = (images.labels != images.classes.index(NEGATIVE_CLASS)).long()
        return replace(images, labels=merged, classes=CLASSES)
    if synthetic:
        return _synthetic_causes(images, seed)
    labels = images.labels.clone()
    normal = images.classes.index(NEGATIVE_CLASS)
    for i, name in enumerate(images.names):
        if int(images.labels[i]) == normal:
            continue
        cause = cause_of(name)
        if cause is None:
            raise UserError(
                f"{name}: data.task three_class needs each pneumonia image's cause in its name "
                f"(_bacteria_ or _virus_, as Kermany's) or BACTERIA/ and VIRUS/ class folders"
            )
        labels[i] = THREE_CLASSES.index(cause)
    return replace(images, labels=labels, classes=THREE_CLASSES)


def _synthetic_causes(images: ImageSet, seed: int) -> ImageSet:
    """Each synthetic pneumonia patient drawn BACTERIA or VIRUS (one cause per patient)."""
    g = torch.Generator().manual_seed(seed + 7919)  # not the stream that drew the images
    labels = torch.zeros_like(images.labels)
    for idx in images.images_by_patient().values():
        if int(images.labels[idx[0]]) != images.classes.index(NEGATIVE_CLASS):
            viral = float(torch.rand((), generator=g)) >= SYNTHETIC_BACTERIA_FRACTION
            labels[idx] = THREE_CLASSES.index("VIRUS" if viral else "BACTERIA")
    return replace(images, labels=labels, classes=THREE_CLASSES)
