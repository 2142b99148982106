"""Client partitions: disjoint, covering, seeded, patients kept whole, skew where asked."""

import pytest
import torch

from pneumonia.core.errors import UserError
from pneumonia.data.imageset import ImageSet
from pneumonia.data.partition import format_table, partition, partition_table


def make_imageset(n_patients: int = 90, per_patient: int = 2, pneumonia_every: int = 3):
    """Patient k has `per_patient` images; every third patient is NORMAL."""
    labels, patients = [], []
    for k in range(n_patients):
        label = 0 if k % pneumonia_every == 0 else 1
        for _ in range(per_patient):
            labels.append(label)
            patients.append(f"site{k % 2}/p{k:03d}")
    n = len(labels)
    return ImageSet(
        torch.zeros(n, 1, 4, 4, dtype=torch.uint8),
        torch.tensor(labels),
        patients,
        [f"img{i}" for i in range(n)],
    )


def check_disjoint_covering(imageset, parts):
    joined = torch.cat(parts)
    assert sorted(joined.tolist()) == list(range(len(imageset)))  # covering, no duplicates
    owner = {}
    for j, idx in enumerate(parts):
        for i in idx.tolist():
            assert owner.setdefault(imageset.patients[i], j) == j  # a patient on one client


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "quantity"])
def test_every_scheme_is_disjoint_covering_and_seeded(scheme):
    images = make_imageset()
    parts = partition(images, scheme, 3, 0.5, seed=1)
    check_disjoint_covering(images, parts)
    again = partition(images, scheme, 3, 0.5, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition(images, scheme, 3, 0.5, seed=2)
    assert any(not torch.equal(a, b) for a, b in zip(parts, other, strict=True))


def test_iid_gives_equal_sizes_and_class_mix():
    images = make_imageset(n_patients=90)  # 180 images: 60 NORMAL, 120 PNEUMONIA
    rows = partition_table(images, partition(images, "iid", 3, 0.5, seed=0))
    assert [r["images"] for r in rows] == [60, 60, 60]
    assert [(r["NORMAL"], r["PNEUMONIA"]) for r in rows] == [(20, 40)] * 3
    assert sum(r["patients"] for r in rows) == 90


def test_single_client_keeps_the_original_order():
    images = make_imageset(n_patients=12)
    (only,) = partition(images, "iid", 1, 0.5, seed=0)
    assert only.tolist() == list(range(len(images)))


def normal_share(images, parts):
    return [float((images.labels[idx] == 0).float().mean()) for idx in parts]


def test_dirichlet_skews_labels_and_quantity_skews_sizes():
    images = make_imageset(n_patients=300, per_patient=1)
    skewed = normal_share(images, partition(images, "dirichlet", 4, 0.3, seed=0))
    even = normal_share(images, partition(images, "dirichlet", 4, 1000.0, seed=0))
    assert max(skewed) - min(skewed) > 0.5  # some client is nearly all one class
    assert max(even) - min(even) < 0.1
    quantity = partition(images, "quantity", 4, 1.0, seed=1)
    sizes = [len(p) for p in quantity]
    assert max(sizes) > 3 * min(sizes)
    mix = normal_share(images, quantity)
    assert max(mix) - min(mix) < 0.05  # sizes differ, the class mix does not


def test_sites_follow_the_patient_prefix():
    images = make_imageset(n_patients=10)
    parts = partition(images, "sites", 0, 0.5, seed=0)
    assert len(parts) == 2
    for site, idx in enumerate(parts):
        assert {images.patients[i].split("/")[0] for i in idx.tolist()} == {f"site{site}"}


def test_more_iid_clients_than_patients_of_a_class_is_refused():
    images = make_imageset(n_patients=6)  # 2 NORMAL patients
    with pytest.raises(UserError, match="federated.clients 3 is more than the 2 patient"):
        partition(images, "iid", 3, 0.5, seed=0)


def test_a_client_left_without_images_is_refused():
    images = make_imageset(n_patients=6, per_patient=1)
    with pytest.raises(UserError, match="left client.*with no images"):
        partition(images, "dirichlet", 5, 0.01, seed=0)


def test_partition_table_text_lists_each_client():
    images = make_imageset(n_patients=9)
    table = format_table(partition_table(images, partition(images, "iid", 3, 0.5, seed=0)))
    lines = table.splitlines()
    assert lines[0] == "| client | images | patients | NORMAL | PNEUMONIA |"
    assert lines[2] == "| 0 | 6 | 3 | 2 | 4 |" and len(lines) == 5
