"""Shift validation: deterministic, every kind used, images changed within range."""

import pytest
import torch

from pneumonia.data.imageset import ImageSet
from pneumonia.data.shifts import KINDS, ShiftConfig, shift_images, shift_kinds, shifted


def imageset(n: int = 24, size: int = 32) -> ImageSet:
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(n, 1, size, size, generator=g) * 200 + 20).to(torch.uint8)
    labels = torch.arange(n) % 2
    return ImageSet(images, labels, [f"p{i // 2}" for i in range(n)], [f"im{i}" for i in range(n)])


def test_every_kind_equally_often_and_the_same_in_every_call():
    kinds = shift_kinds(len(KINDS) * 3, seed=5)
    assert sorted(kinds) == sorted(list(KINDS) * 3)
    assert kinds == shift_kinds(len(KINDS) * 3, seed=5)
    assert kinds != shift_kinds(len(KINDS) * 3, seed=6)


def test_shifted_set_is_deterministic_and_keeps_patients_labels_and_dtype():
    original = imageset()
    a, b = shifted(original, ShiftConfig()), shifted(original, ShiftConfig())
    assert torch.equal(a.images, b.images)
    assert a.images.dtype == torch.uint8 and a.images.shape == original.images.shape
    assert a.patients == original.patients and torch.equal(a.labels, original.labels)
    assert a.names[0].startswith("im0#") and a.names[0].split("#")[1] in KINDS


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_changes_the_image(kind):
    original = imageset(4)
    out = shift_images(original.images, [kind] * 4, seed=0)
    change = (out.float() - original.images.float()).abs().mean()
    assert change > 1.0, kind  # more than one grey level on average


def test_unknown_kind_is_an_error():
    with pytest.raises(ValueError, match="unknown shift"):
        shift_images(imageset(1).images, ["sepia"], seed=0)


def test_load_splits_gives_the_same_shift_validation_every_time():
    from pneumonia.data.sources import DataConfig, SyntheticConfig, load_splits

    cfg = DataConfig(image_size=32, synthetic=SyntheticConfig(n_patients=30))
    a, b = load_splits(cfg, seed=0), load_splits(cfg, seed=0)
    assert torch.equal(a.val_shift.images, b.val_shift.images)
    assert a.val_shift.patients == a.val.patients
    assert not torch.equal(a.val_shift.images, a.val.images)
    no_shift = DataConfig(image_size=32, synthetic=cfg.synthetic, shift=ShiftConfig(False))
    off = load_splits(no_shift, seed=0)
    assert off.val_shift is None and list(off.evaluation_sets()) == ["val"]
