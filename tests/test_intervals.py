"""Bootstrap intervals by patient, and the weighted metrics behind them."""

import pytest
import torch

from pneumonia.metrics.classification import DiagnosisMetrics
from pneumonia.metrics.intervals import bootstrap_intervals, patient_weights, weighted_metrics


def test_patient_weights_draw_whole_patients():
    patients = ["a", "a", "b", "c", "c", "c"]
    w = patient_weights(patients, 6, replicates=200, seed=1)
    assert w.shape == (200, 6)
    # Images of one patient are drawn together: equal counts within a patient.
    assert torch.equal(w[:, 0], w[:, 1]) and torch.equal(w[:, 3], w[:, 5])
    # Three patients drawn three times per replicate.
    assert torch.equal(w[:, [0, 2, 3]].sum(1), torch.full((200,), 3.0, dtype=w.dtype))


def test_weighted_metrics_with_unit_weights_equal_torchmetrics():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(300, generator=g)
    p[:40] = 0.5  # ties at the threshold and inside the ROC
    t = torch.rand(300, generator=g) < p
    reference = DiagnosisMetrics(0.5)
    reference.update(p, t)
    expected = reference.compute()
    got = weighted_metrics(p, t, torch.ones(1, 300, dtype=torch.float64), 0.5)
    for key in ("accuracy", "precision", "recall", "f1", "specificity", "auroc", "ece"):
        assert float(got[key][0]) == pytest.approx(expected[key], abs=1e-6), key


def test_weights_count_an_image_as_often_as_drawn():
    p = torch.tensor([0.9, 0.2, 0.6, 0.4])
    t = torch.tensor([True, False, False, True])
    # Image 0 twice, image 3 not at all: TP 2, TN 1, FP 1, FN 0.
    w = torch.tensor([[2.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    got = weighted_metrics(p, t, w, 0.5)
    assert float(got["accuracy"][0]) == pytest.approx(3 / 4)
    assert float(got["precision"][0]) == pytest.approx(2 / 3)
    assert float(got["specificity"][0]) == pytest.approx(1 / 2)
    # AUROC: positive 0.9 (weight 2) beats both negatives (0.2, 0.6): 1.0.
    assert float(got["auroc"][0]) == pytest.approx(1.0)


def test_two_patient_case_matches_the_exact_bootstrap_distribution():
    # Patient A (2 images) right, patient B (2 images) wrong at 0.5. A replicate draws two
    # patients: AA (p 1/4) gives accuracy 1, AB or BA (1/2) gives 0.5, BB (1/4) gives 0.
    p = torch.tensor([0.9, 0.1, 0.1, 0.9])
    t = torch.tensor([True, False, True, False])
    patients = ["A", "A", "B", "B"]
    w = patient_weights(patients, 4, replicates=4000, seed=0)
    acc = weighted_metrics(p, t, w, 0.5)["accuracy"]
    assert float((acc == 1).double().mean()) == pytest.approx(0.25, abs=0.03)
    assert float((acc == 0.5).double().mean()) == pytest.approx(0.5, abs=0.03)
    assert bootstrap_intervals(p, t, 0.5, patients, replicates=4000)["accuracy"] == [0.0, 1.0]


def test_same_seed_same_interval_and_interval_brackets_the_estimate():
    g = torch.Generator().manual_seed(3)
    p = torch.rand(200, generator=g)
    t = torch.rand(200, generator=g) < p
    patients = [str(i // 2) for i in range(200)]
    a = bootstrap_intervals(p, t, 0.5, patients, seed=7)
    assert a == bootstrap_intervals(p, t, 0.5, patients, seed=7)
    assert a != bootstrap_intervals(p, t, 0.5, patients, seed=8)
    point = weighted_metrics(p, t, torch.ones(1, 200, dtype=torch.float64), 0.5)
    for key, (low, high) in a.items():
        assert low <= float(point[key][0]) <= high, key
        assert high - low > 0.01, key  # 200 images: not a degenerate interval


def test_metric_undefined_in_every_replicate_is_nan():
    p, t = torch.tensor([0.2, 0.3]), torch.tensor([False, False])  # no positive at all
    out = bootstrap_intervals(p, t, 0.5, replicates=50)
    assert out["recall"][0] != out["recall"][0]  # nan
    assert out["specificity"] == [1.0, 1.0]
