"""The decoded form every data source produces: uint8 images, labels and patient ids."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

CLASSES: tuple[str, ...] = ("NORMAL", "PNEUMONIA")
# data.task three_class: pneumonia split by its cause, as Kermany's file names give it.
THREE_CLASSES: tuple[str, ...] = ("NORMAL", "BACTERIA", "VIRUS")
NEGATIVE_CLASS = "NORMAL"  # every other class is a kind of pneumonia


@dataclass
class ImageSet:
    """Decoded images of one split.

    images: uint8 tensor [N, 1, S, S]; labels: int64 [N] indexing `classes`;
    patients and names: one string per image (patients drive the split, names the errors).
    """

    images: torch.Tensor
    labels: torch.Tensor
    patients: list[str]
    names: list[str]
    classes: tuple[str, ...] = field(default=CLASSES)

    def __post_init__(self) -> None:
        n = len(self.labels)
        if not (self.images.shape[0] == n == len(self.patients) == len(self.names)):
            raise ValueError("images, labels, patients and names must have one entry per image")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def subset(self, index: torch.Tensor | list[int]) -> ImageSet:
        """The images at `index`, in that order."""
        idx = torch.as_tensor(index, dtype=torch.long)
        pick = idx.tolist()
        return ImageSet(
            images=self.images[idx],
            labels=self.labels[idx],
            patients=[self.patients[i] for i in pick],
            names=[self.names[i] for i in pick],
            classes=self.classes,
        )

    def pixel_mean_std(self, chunk: int = 512) -> tuple[float, float]:
        """Mean and standard deviation of all pixels scaled to [0, 1], in chunks: a float copy
        of 5,000 images at 224 px would take about 1 GB."""
        total, total_sq, count = 0.0, 0.0, 0
        for start in range(0, len(self), chunk):
            block = self.images[start : start + chunk].double() / 255.0
            total += float(block.sum())
            total_sq += float((block * block).sum())
            count += block.numel()
        mean = total / count
        return mean, max(total_sq / count - mean * mean, 0.0) ** 0.5

    def pixel_moments(self) -> tuple[int, float, float]:
        """(images, mean, mean of squares) of the pixels in [0, 1]: enough for a federation to
        agree on one normalisation without pooling images."""
        mean, std = self.pixel_mean_std()
        return len(self), mean, std * std + mean * mean

    def images_by_patient(self) -> dict[str, list[int]]:
        """patient -> indices of their images, patients in order of first appearance."""
        out: dict[str, list[int]] = {}
        for i, patient in enumerate(self.patients):
            out.setdefault(patient, []).append(i)
        return out

    def class_counts(self) -> list[int]:
        """Images per class, in `classes` order."""
        return torch.bincount(self.labels, minlength=len(self.classes)).tolist()
