import pytest

from pneumonia.data.patients import patient_id


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("IM-0115-0002.jpeg", "IM-0115"),
        ("IM-0629-0001-0003.jpeg", "IM-0629"),
        ("NORMAL2-IM-1427-0001.jpeg", "NORMAL2-IM-1427"),
        ("person1000_bacteria_2931.jpeg", "person1000"),
        ("person1000_virus_1681.jpeg", "person1000"),
        ("person447_virus_921_1.jpeg", "person447"),
        ("IM-0115-0001.png", "IM-0115"),
        ("NORMAL/IM-0115-0001.jpeg", "IM-0115"),
        ("chest_xray/train/PNEUMONIA/person3_virus_15.jpeg", "person3"),
    ],
)
def test_patient_id_of_every_kermany_naming_variant(filename, expected):
    assert patient_id(filename) == expected


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("scan_42.png", "scan_42"),
        ("IM-0115.jpeg", "IM-0115"),
        ("personA_virus.jpeg", "personA_virus"),
    ],
)
def test_unknown_pattern_gives_file_stem(filename, expected):
    assert patient_id(filename) == expected


def test_normal2_series_is_a_different_patient_from_plain_im_series():
    assert patient_id("NORMAL2-IM-1427-0001.jpeg") != patient_id("IM-1427-0001.jpeg")
