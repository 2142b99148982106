"""data.task: three-class labels from Kermany's names or from three class folders."""

from pathlib import Path

import pytest
import torch

from pneumonia.core.errors import UserError
from pneumonia.data.imageset import CLASSES, THREE_CLASSES, ImageSet
from pneumonia.data.kermany import folder_classes, list_image_files
from pneumonia.data.sources import DataConfig, load_splits
from pneumonia.data.split import split_by_patient
from pneumonia.data.tasks import cause_of, for_task
from tests.conftest import write_image


@pytest.mark.parametrize(
    ("name", "cause"),
    [
        ("person1000_bacteria_2931.jpeg", "BACTERIA"),
        ("person1000_virus_1681.jpeg", "VIRUS"),
        ("person447_virus_921_1.jpeg", "VIRUS"),  # the odd one with a second counter
        ("PNEUMONIA/person3_Bacteria_11.JPEG", "BACTERIA"),
        ("site_a/person12_virus_44.png", "VIRUS"),
        ("IM-0115-0001.jpeg", None),
        ("NORMAL2-IM-1427-0001.jpeg", None),
        ("bacterial_thing.jpeg", None),  # a word that only starts like one
    ],
)
def test_cause_from_kermany_names(name, cause):
    assert cause_of(name) == cause


def _set(labels, names, classes=CLASSES):
    n = len(labels)
    return ImageSet(
        torch.zeros(n, 1, 4, 4, dtype=torch.uint8),
        torch.tensor(labels),
        [name.split("_")[0] for name in names],
        names,
        classes,
    )


def test_binary_labels_split_by_name_and_merge_back():
    names = ["IM-0001-0001.jpeg", "person1_bacteria_1.jpeg", "person447_virus_921_1.jpeg"]
    three = for_task(_set([0, 1, 1], names), "three_class")
    assert three.classes == THREE_CLASSES
    assert three.labels.tolist() == [0, 1, 2]
    binary = for_task(three, "binary")
    assert binary.classes == CLASSES and binary.labels.tolist() == [0, 1, 1]


def test_a_pneumonia_name_without_its_cause_is_named_in_the_error():
    images = _set([0, 1], ["IM-0001-0001.jpeg", "chest_scan_7.jpeg"])
    with pytest.raises(UserError, match="chest_scan_7.jpeg: data.task three_class needs"):
        for_task(images, "three_class")


def test_synthetic_causes_are_seeded_and_one_per_patient():
    names = [f"synth-{p:04d}-{i}" for p in range(40) for i in range(2)]
    images = ImageSet(
        torch.zeros(80, 1, 4, 4, dtype=torch.uint8),
        torch.tensor([int(p % 4 != 0) for p in range(40) for _ in range(2)]),
        [n.rsplit("-", 1)[0] for n in names],
        names,
    )
    a = for_task(images, "three_class", seed=3, synthetic=True)
    b = for_task(images, "three_class", seed=3, synthetic=True)
    assert torch.equal(a.labels, b.labels)
    assert (a.labels == 0).tolist() == (images.labels == 0).tolist()  # NORMAL stays NORMAL
    assert set(a.labels.tolist()) == {0, 1, 2}
    pairs = a.labels.view(40, 2)
    assert torch.equal(pairs[:, 0], pairs[:, 1])  # both images of a patient share the cause


def _three_folder(root: Path) -> Path:
    for cls, mean, names in (
        ("NORMAL", 40, [f"IM-{p:04d}-0001" for p in range(6)]),
        ("BACTERIA", 160, [f"patient{p}_a" for p in range(6)]),
        ("VIRUS", 220, [f"patient{p}_b" for p in range(6, 12)]),
    ):
        for k, name in enumerate(names):
            write_image(root / cls / f"{name}.png", mean, (40, 40), fmt="PNG", seed=k)
    return root


def test_a_three_folder_layout_gives_three_classes(tmp_path):
    root = _three_folder(tmp_path / "three")
    assert folder_classes(root) == THREE_CLASSES
    files = list_image_files(root)
    assert [f.label for f in files] == [0] * 6 + [1] * 6 + [2] * 6
    splits = load_splits(DataConfig(root=str(root), image_size=16, task="three_class"), seed=0)
    assert splits.train.classes == THREE_CLASSES
    assert set(splits.val.labels.tolist()) == {0, 1, 2}  # stratified by all three
    binary = load_splits(DataConfig(root=str(root), image_size=16), seed=0)
    assert binary.train.classes == CLASSES and set(binary.train.labels.tolist()) == {0, 1}


def test_kermany_names_give_three_classes_through_load_splits(kermany_root):
    splits = load_splits(DataConfig(root=str(kermany_root), image_size=16, task="three_class"), 0)
    for part in (splits.train, splits.val):
        assert part.classes == THREE_CLASSES
        for name, label in zip(part.names, part.labels.tolist(), strict=True):
            assert label == (0 if cause_of(name) is None else THREE_CLASSES.index(cause_of(name)))


def test_patient_split_is_stratified_by_three_classes():
    # 30 patients per class, one image each: 20% of each class goes to validation.
    labels = [c for c in range(3) for _ in range(30)]
    names = [f"p{c}-{k}" for c in range(3) for k in range(30)]
    images = ImageSet(
        torch.zeros(90, 1, 4, 4, dtype=torch.uint8), torch.tensor(labels), names, names,
        THREE_CLASSES,
    )  # fmt: skip
    _, val = split_by_patient(images, 0.2, seed=0)
    assert torch.bincount(images.labels[val], minlength=3).tolist() == [6, 6, 6]


def test_train_fraction_keeps_a_stratified_tenth_and_the_same_validation(kermany_root, tmp_path):
    big = tmp_path / "big"
    from tests.conftest import write_kermany_folder

    write_kermany_folder(big, n_normal_patients=40, n_pneumonia_patients=40, size=(20, 20))
    full = load_splits(DataConfig(root=str(big), image_size=16), seed=0)
    small = load_splits(DataConfig(root=str(big), image_size=16, train_fraction=0.25), seed=0)
    assert small.val.names == full.val.names
    assert set(small.train.names) < set(full.train.names)
    assert 0.15 < len(small.train) / len(full.train) < 0.35
    assert set(small.train.labels.tolist()) == {0, 1}


def test_split_from_validates_on_another_runs_validation_patients(kermany_root, tmp_path):
    first = load_splits(DataConfig(root=str(kermany_root), image_size=16), seed=0)
    rows = ["split,class,patient,name"]
    rows += [f"val,x,{p},n" for p in first.val.patients]
    rows += [f"train,x,{p},n" for p in first.train.patients]
    (tmp_path / "split.csv").write_text("\n".join(rows) + "\n")
    other_seed = DataConfig(root=str(kermany_root), image_size=16, task="three_class",
                            split_from=str(tmp_path / "split.csv"))  # fmt: skip
    again = load_splits(other_seed, seed=5)
    assert sorted(again.val.names) == sorted(first.val.names)
    assert not set(again.train.patients) & set(again.val.patients)
    (tmp_path / "bad.csv").write_text("split,class,patient,name\nval,x,nobody,n\n")
    with pytest.raises(UserError, match="data.split_from .*bad.csv: its validation patients"):
        load_splits(replace_split(other_seed, tmp_path / "bad.csv"), seed=0)
    with pytest.raises(UserError, match="data.split_from .*missing.csv does not exist"):
        load_splits(replace_split(other_seed, tmp_path / "missing.csv"), seed=0)


def replace_split(cfg: DataConfig, path: Path) -> DataConfig:
    from dataclasses import replace

    return replace(cfg, split_from=str(path))
