"""The synthetic radiograph generator: shapes, determinism, labels, patients, anatomy."""

from __future__ import annotations

import re
from collections import defaultdict

import pytest
import torch

from pneumonia.data.synthetic import generate_synthetic


@pytest.fixture(scope="module")
def draw():
    """One shared medium draw: enough images for class averages, small enough to be fast."""
    return generate_synthetic(n_patients=240, image_size=32, seed=11)


def _by_patient(ds) -> dict[str, list[int]]:
    rows: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(ds.patients):
        rows[p].append(i)
    return rows


def _box_mean(images: torch.Tensor, x0: float, x1: float, y0: float, y1: float) -> torch.Tensor:
    """Mean intensity per image inside a box given in [-1, 1] image coordinates."""
    s = images.shape[-1]
    px = lambda v: int(round((v + 1) / 2 * s))  # noqa: E731
    return images[:, 0, px(y0) : px(y1), px(x0) : px(x1)].float().mean(dim=(1, 2))


def test_shapes_dtypes_and_names():
    ds = generate_synthetic(n_patients=12, image_size=24, seed=0, max_images_per_patient=2)
    n = len(ds)
    assert ds.images.shape == (n, 1, 24, 24) and ds.images.dtype == torch.uint8
    assert ds.labels.shape == (n,) and ds.labels.dtype == torch.int64
    assert set(ds.labels.tolist()) <= {0, 1}
    assert ds.classes == ("NORMAL", "PNEUMONIA")
    assert all(re.fullmatch(r"synth-\d{4}", p) for p in ds.patients)
    assert all(name.startswith(p + "-") for name, p in zip(ds.names, ds.patients, strict=True))
    assert len(set(ds.names)) == n
    assert len(set(ds.patients)) == 12


def test_same_seed_same_tensors_different_seed_different_images():
    a = generate_synthetic(n_patients=10, image_size=16, seed=3)
    b = generate_synthetic(n_patients=10, image_size=16, seed=3)
    c = generate_synthetic(n_patients=10, image_size=16, seed=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.patients == b.patients and a.names == b.names
    m = min(len(a), len(c))
    assert not torch.equal(a.images[:m], c.images[:m])


def test_global_rng_is_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generate_synthetic(n_patients=5, image_size=16, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_label_fraction_follows_pneumonia_fraction():
    fraction = 0.3  # not the default, so the argument is seen to act
    # 1000 patients: the binomial standard error is about 0.015, so 0.05 is over 3 sigma.
    ds = generate_synthetic(
        n_patients=1000,
        image_size=16,
        seed=0,
        pneumonia_fraction=fraction,
        max_images_per_patient=1,
    )
    per_patient = {p: ds.labels[rows[0]].item() for p, rows in _by_patient(ds).items()}
    assert len(per_patient) == 1000
    assert abs(sum(per_patient.values()) / 1000 - fraction) < 0.05


@pytest.mark.parametrize("fraction, label", [(0.0, 0), (1.0, 1)])
def test_extreme_fractions_give_one_class(fraction, label):
    ds = generate_synthetic(n_patients=30, image_size=16, seed=2, pneumonia_fraction=fraction)
    assert set(ds.labels.tolist()) == {label}


@pytest.mark.parametrize("max_images", [1, 3, 5])
def test_images_per_patient_and_one_label_per_patient(max_images):
    ds = generate_synthetic(n_patients=60, image_size=16, seed=1, max_images_per_patient=max_images)
    rows = _by_patient(ds)
    counts = [len(r) for r in rows.values()]
    assert len(rows) == 60
    assert min(counts) >= 1 and max(counts) <= max_images
    if max_images > 1:
        assert len(set(counts)) > 1  # the count is drawn, not fixed
    for r in rows.values():
        assert len(set(ds.labels[r].tolist())) == 1


def test_pneumonia_lungs_are_brighter_on_average(draw):
    # Boxes well inside both lung fields for every drawn anatomy.
    lungs = (
        _box_mean(draw.images, -0.6, -0.25, -0.3, 0.45)
        + _box_mean(draw.images, 0.25, 0.6, -0.3, 0.45)
    ) / 2
    normal = lungs[draw.labels == 0].mean()
    pneumonia = lungs[draw.labels == 1].mean()
    assert pneumonia - normal > 5.0, (normal, pneumonia)  # grey levels out of 255


def test_anatomy_dark_background_bright_mediastinum_dark_lungs(draw):
    corners = _box_mean(draw.images, -1.0, -0.9, 0.9, 1.0).mean()
    spine = _box_mean(draw.images, -0.05, 0.05, -0.4, 0.0).mean()
    normal = draw.images[draw.labels == 0]
    lung = _box_mean(normal, -0.6, -0.25, -0.3, 0.45).mean()
    assert corners < lung < spine, (corners, lung, spine)


def test_images_of_one_patient_resemble_each_other_more_than_others(draw):
    x = draw.images.float()
    same, other = [], []
    rows = [r for r in _by_patient(draw).values() if len(r) >= 2]
    for k, r in enumerate(rows):
        same.append((x[r[0]] - x[r[1]]).abs().mean())
        other.append((x[r[0]] - x[rows[k - 1][0]]).abs().mean())
    assert torch.stack(same).mean() < 0.8 * torch.stack(other).mean()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_patients": 0}, "n_patients"),
        ({"image_size": 15}, "image_size"),
        ({"pneumonia_fraction": -0.1}, "pneumonia_fraction"),
        ({"pneumonia_fraction": 1.5}, "pneumonia_fraction"),
        ({"max_images_per_patient": 0}, "max_images_per_patient"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_synthetic(**kwargs)
