"""ImageSet: the decoded form every source produces."""

import pytest
import torch

from pneumonia.data.imageset import ImageSet


def test_pixel_mean_std_in_chunks_matches_whole_tensor():
    images = torch.randint(0, 256, (7, 1, 5, 5), dtype=torch.uint8)
    imageset = ImageSet(images, torch.zeros(7, dtype=torch.long), ["p"] * 7, ["n"] * 7)
    mean, std = imageset.pixel_mean_std(chunk=3)
    as_float = images.double() / 255.0
    assert mean == pytest.approx(float(as_float.mean()))
    assert std == pytest.approx(float(as_float.std(unbiased=False)))


def test_subset_keeps_images_labels_patients_and_names_together():
    images = torch.arange(4, dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 1, 2, 2).clone()
    imageset = ImageSet(
        images, torch.tensor([0, 1, 0, 1]), ["a", "b", "c", "d"], ["0", "1", "2", "3"]
    )
    part = imageset.subset([3, 1])
    assert part.images[:, 0, 0, 0].tolist() == [3, 1]
    assert (
        part.labels.tolist() == [1, 1] and part.patients == ["d", "b"] and part.names == ["3", "1"]
    )
    assert imageset.class_counts() == [2, 2]


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="one entry per image"):
        ImageSet(
            torch.zeros(2, 1, 2, 2, dtype=torch.uint8),
            torch.zeros(3, dtype=torch.long),
            ["a", "b"],
            ["0", "1"],
        )
