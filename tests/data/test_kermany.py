import re
from collections import Counter

import pytest

from pneumonia.core.errors import UserError
from pneumonia.data.kermany import find_splits, list_image_files


def test_flat_root_is_one_train_split(kermany_root):
    assert find_splits(kermany_root) == {"train": kermany_root}


def test_train_test_layout_gives_each_split(tmp_path, write_kermany):
    write_kermany(tmp_path / "train", 3, 3)
    write_kermany(tmp_path / "test", 2, 2, first_patient=500)
    (tmp_path / "notes").mkdir()  # a stray folder is not a split
    assert find_splits(tmp_path) == {"train": tmp_path / "train", "test": tmp_path / "test"}


def test_split_folders_without_train_raise(tmp_path, write_kermany):
    write_kermany(tmp_path / "test", 2, 2)
    with pytest.raises(UserError, match="no train/"):
        find_splits(tmp_path)


def test_list_image_files_labels_and_patients(kermany_root):
    files = list_image_files(kermany_root)
    assert len(files) == 27
    assert Counter(f.label for f in files) == {0: 12, 1: 15}
    assert all(f.path.parent.name == ("NORMAL", "PNEUMONIA")[f.label] for f in files)
    assert [f.label for f in files] == sorted(f.label for f in files)  # class, then name
    assert len({f.patient for f in files if f.label == 0}) == 6
    assert len({f.patient for f in files if f.label == 1}) == 8
    by_name = {f.path.name: f.patient for f in files}
    assert by_name["IM-0101-0001-0002.png"] == "IM-0101"
    assert by_name["NORMAL2-IM-0102-0003.jpeg"] == "NORMAL2-IM-0102"
    assert by_name["person107_virus_10701_1.jpeg"] == "person107"


def test_class_folders_match_case_insensitively(tmp_path, write_kermany):
    root = write_kermany(tmp_path / "upper", 2, 2)
    lower = tmp_path / "lower"
    lower.mkdir()
    (root / "NORMAL").rename(lower / "normal")
    (root / "PNEUMONIA").rename(lower / "Pneumonia")
    assert find_splits(lower) == {"train": lower}
    assert Counter(f.label for f in list_image_files(lower)) == {0: 3, 1: 3}


def test_hidden_files_are_ignored(kermany_root):
    (kermany_root / "NORMAL" / ".DS_Store").write_bytes(b"\0\1junk")
    (kermany_root / "PNEUMONIA" / "._person100_bacteria_10001.png").write_bytes(b"junk")
    names = {f.path.name for f in list_image_files(kermany_root)}
    assert len(names) == 27
    assert not any(name.startswith(".") for name in names)


def test_missing_root_raises_with_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match=re.escape(str(missing))):
        find_splits(missing)


def test_root_without_class_folders_raises_with_path(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "a.jpeg").write_bytes(b"x")
    with pytest.raises(UserError, match=re.escape(f"{tmp_path} has no class folders")):
        find_splits(tmp_path)


def test_empty_class_folder_raises_with_its_path(kermany_root):
    for f in (kermany_root / "PNEUMONIA").iterdir():
        f.unlink()
    (kermany_root / "PNEUMONIA" / ".DS_Store").write_bytes(b"x")  # hidden files do not count
    with pytest.raises(UserError, match=re.escape(str(kermany_root / "PNEUMONIA"))):
        list_image_files(kermany_root)


def test_missing_one_class_folder_raises_naming_folder_and_class(tmp_path, write_kermany):
    root = write_kermany(tmp_path / "data", 2, 2)
    for f in (root / "PNEUMONIA").iterdir():
        f.unlink()
    (root / "PNEUMONIA").rmdir()
    folder = find_splits(root)["train"]
    with pytest.raises(UserError, match=re.escape(f"{root} lacks class folder(s) PNEUMONIA")):
        list_image_files(folder)


def test_data_root_that_is_a_file(tmp_path):
    path = tmp_path / "images.zip"
    path.write_bytes(b"PK")
    with pytest.raises(UserError, match=f"data root {path} is a file"):
        find_splits(path)
