import pytest
import torch

from pneumonia.core.errors import UserError
from pneumonia.data.imageset import ImageSet
from pneumonia.data.sources import DataConfig, load_splits
from pneumonia.data.split import split_by_patient


def make_imageset(n_normal: int, n_pneumonia: int, seed: int = 0) -> ImageSet:
    """Patients with 1-3 tiny images each; NORMAL patients n0.., PNEUMONIA patients p0.."""
    g = torch.Generator().manual_seed(seed)
    labels, patients = [], []
    for label, prefix, n in ((0, "n", n_normal), (1, "p", n_pneumonia)):
        for k in range(n):
            count = int(torch.randint(1, 4, (1,), generator=g))
            labels += [label] * count
            patients += [f"{prefix}{k}"] * count
    order = torch.randperm(len(labels), generator=g).tolist()  # patients' images interleaved
    return ImageSet(
        images=torch.zeros(len(labels), 1, 4, 4, dtype=torch.uint8),
        labels=torch.tensor([labels[i] for i in order]),
        patients=[patients[i] for i in order],
        names=[f"img{i}.jpeg" for i in range(len(labels))],
    )


@pytest.fixture(scope="module")
def imageset():
    return make_imageset(60, 90)


def test_split_is_disjoint_and_covering(imageset):
    train, val = split_by_patient(imageset, 0.2, seed=0)
    assert len(train) + len(val) == len(imageset)
    assert sorted(train.tolist() + val.tolist()) == list(range(len(imageset)))
    assert len(val) > 0 and len(train) > len(val)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_patient_on_both_sides(imageset, seed):
    train, val = split_by_patient(imageset, 0.2, seed)
    train_patients = {imageset.patients[i] for i in train.tolist()}
    val_patients = {imageset.patients[i] for i in val.tolist()}
    assert train_patients.isdisjoint(val_patients)
    assert len(train_patients) + len(val_patients) == 150


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5])
def test_each_class_val_share_is_close_to_val_fraction(imageset, fraction):
    _, val = split_by_patient(imageset, fraction, seed=0)
    for label in (0, 1):
        total = int((imageset.labels == label).sum())
        share = int((imageset.labels[val] == label).sum()) / total
        # whole patients (at most 3 images) are added until the share reaches the target
        assert fraction <= share <= fraction + 3 / total


def test_same_seed_same_split_other_seed_other_split(imageset):
    a_train, a_val = split_by_patient(imageset, 0.2, seed=7)
    b_train, b_val = split_by_patient(imageset, 0.2, seed=7)
    _, c_val = split_by_patient(imageset, 0.2, seed=8)
    assert torch.equal(a_train, b_train) and torch.equal(a_val, b_val)
    assert set(a_val.tolist()) != set(c_val.tolist())


@pytest.mark.parametrize("fraction", [0.01, 0.99])
def test_both_classes_on_both_sides_even_at_extreme_fractions(fraction):
    small = make_imageset(2, 3)
    train, val = split_by_patient(small, fraction, seed=0)
    assert set(small.labels[train].tolist()) == {0, 1}
    assert set(small.labels[val].tolist()) == {0, 1}


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_val_fraction_outside_open_unit_interval_raises(imageset, fraction):
    with pytest.raises(UserError, match="val_fraction"):
        split_by_patient(imageset, fraction, seed=0)


def test_class_with_single_patient_raises_naming_class():
    one_normal = make_imageset(1, 5)
    with pytest.raises(UserError, match="class NORMAL has 1 patient"):
        split_by_patient(one_normal, 0.2, seed=0)


def patients_of(imageset: ImageSet) -> set[str]:
    return set(imageset.patients)


def test_load_splits_of_flat_folder_keeps_patients_apart(kermany_root):
    splits = load_splits(
        DataConfig(root=str(kermany_root), image_size=32, val_fraction=0.3), seed=0
    )
    assert splits.test is None
    assert len(splits.train) + len(splits.val) == 27
    assert patients_of(splits.train).isdisjoint(patients_of(splits.val))
    assert set(splits.val.labels.tolist()) == {0, 1}
    assert splits.train.images.shape[1:] == (1, 32, 32)
    # NORMAL images are written dark, PNEUMONIA bright: labels follow the pixels
    brightness = splits.train.images.float().mean(dim=(1, 2, 3))
    assert brightness[splits.train.labels == 0].max() < brightness[splits.train.labels == 1].min()


def test_load_splits_of_train_val_test_layout(tmp_path, write_kermany):
    root = tmp_path / "chest_xray"
    write_kermany(root / "train", 6, 8)
    write_kermany(root / "val", 2, 2, first_patient=300)
    write_kermany(root / "test", 3, 3, first_patient=500)
    splits = load_splits(DataConfig(root=str(root), image_size=32, val_fraction=0.3), seed=0)
    assert splits.source == str(root)
    # train/ and val/ are pooled, then split by patient; test/ stays apart
    assert len(splits.train) + len(splits.val) == 27 + 6
    assert patients_of(splits.train).isdisjoint(patients_of(splits.val))
    assert splits.test is not None and len(splits.test) == 12
    assert {p[-3:] for p in patients_of(splits.test)} == {"500", "501", "502"}
    assert patients_of(splits.test).isdisjoint(patients_of(splits.train) | patients_of(splits.val))
