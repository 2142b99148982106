"""Validation split by patient, stratified by class: no patient on both sides."""

from __future__ import annotations

from collections import defaultdict

import torch

from pneumonia.core.errors import UserError
from pneumonia.data.imageset import ImageSet


def split_by_patient(
    imageset: ImageSet, val_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val): whole patients go to validation until each class holds about
    `val_fraction` of its images there. The same seed gives the same split."""
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"data.val_fraction {val_fraction} must lie strictly between 0 and 1")
    images_of = imageset.images_by_patient()
    # A patient's class is that of its first image (Kermany patients have a single class).
    by_class: dict[int, list[str]] = defaultdict(list)
    for patient, idx in images_of.items():
        by_class[int(imageset.labels[idx[0]])].append(patient)
    generator = torch.Generator().manual_seed(seed)
    val: list[int] = []
    for label in sorted(by_class):
        patients = sorted(by_class[label])
        if len(patients) < 2:
            raise UserError(
                f"class {imageset.classes[label]} has {len(patients)} patient(s): need at least 2 "
                f"to hold one out for validation"
            )
        order = torch.randperm(len(patients), generator=generator).tolist()
        target = val_fraction * sum(len(images_of[p]) for p in patients)
        taken = 0
        # Stop before the last patient so training always keeps every class.
        for k in order[:-1]:
            if taken >= target:
                break
            val += images_of[patients[k]]
            taken += len(images_of[patients[k]])
    val_set = set(val)
    train = [i for i in range(len(imageset)) if i not in val_set]
    return torch.tensor(train, dtype=torch.long), torch.tensor(sorted(val), dtype=torch.long)
