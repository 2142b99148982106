"""Metrics against a confusion matrix worked out by hand."""

import pytest
import torch

from pneumonia.metrics.classification import DiagnosisMetrics, youden_threshold


def test_metrics_match_hand_computed_confusion_matrix():
    # targets: 4 positive, 6 negative; predictions thresholded at 0.5
    probs = torch.tensor([0.9, 0.8, 0.7, 0.2, 0.6, 0.55, 0.4, 0.3, 0.1, 0.05])
    targets = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    # TP = 3, FN = 1, FP = 2, TN = 4
    metrics = DiagnosisMetrics(threshold=0.5)
    metrics.update(probs, targets)
    values = metrics.compute()
    assert values["confusion_matrix"] == [[4, 2], [1, 3]]
    assert values["n"] == 10
    assert values["accuracy"] == pytest.approx(7 / 10)
    assert values["precision"] == pytest.approx(3 / 5)
    assert values["recall"] == pytest.approx(3 / 4)
    assert values["specificity"] == pytest.approx(4 / 6)
    assert values["f1"] == pytest.approx(2 * 0.6 * 0.75 / (0.6 + 0.75))
    # AUROC: of the 24 positive/negative pairs, the positive scores higher in 3 * 6 + 2 = 20
    assert values["auroc"] == pytest.approx(20 / 24)


def test_threshold_moves_the_operating_point():
    probs = torch.tensor([0.9, 0.6, 0.6, 0.2])
    targets = torch.tensor([1, 1, 0, 0])
    strict = DiagnosisMetrics(threshold=0.7)
    strict.update(probs, targets)
    assert strict.compute()["confusion_matrix"] == [[2, 0], [1, 1]]


def test_reset_and_figures():
    metrics = DiagnosisMetrics()
    metrics.update(torch.tensor([0.9, 0.1]), torch.tensor([1, 0]))
    figures = metrics.figures(("NORMAL", "PNEUMONIA"))
    assert set(figures) == {"confusion_matrix", "roc", "reliability"}
    metrics.reset()
    metrics.update(torch.tensor([0.9, 0.9]), torch.tensor([0, 0]))
    assert metrics.compute()["confusion_matrix"] == [[0, 2], [0, 0]]


def test_youden_threshold_by_hand():
    # Negatives 0.1 0.3 0.5, positives 0.4 0.6 0.7 0.9. Sensitivity + specificity - 1 at each
    # threshold: 0.9 -> 0.25, 0.7 -> 0.5, 0.6 -> 0.75, 0.5 -> 0.42, 0.4 -> 0.67: 0.6 wins.
    probs = torch.tensor([0.1, 0.3, 0.5, 0.4, 0.6, 0.7, 0.9])
    targets = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    assert youden_threshold(probs, targets) == pytest.approx(0.6)


def test_ece_and_reliability_bins_against_hand_values():
    from pneumonia.metrics.classification import (
        DiagnosisMetrics,
        reliability_bins,
        reliability_figure,
    )

    probs = torch.tensor([0.1, 0.2, 0.8, 0.9, 0.95, 0.35])
    targets = torch.tensor([False, True, True, True, False, False])
    metrics = DiagnosisMetrics(0.5)
    metrics.update(probs, targets)
    # Bins |observed - predicted|: 0.1, 0.8, 0.35, 0.2, and two images at |0.5 - 0.925|.
    assert metrics.compute()["ece"] == pytest.approx((0.1 + 0.8 + 0.35 + 0.2 + 2 * 0.425) / 6)
    rows = reliability_bins(probs, targets.float())
    assert [r["n"] for r in rows] == [1, 1, 1, 1, 2]
    assert rows[-1]["observed"] == 0.5 and rows[-1]["predicted"] == pytest.approx(0.925)
    figure = reliability_figure(probs, targets, "PNEUMONIA")
    assert "ECE 0.383" in figure.axes[0].get_legend().get_texts()[1].get_text()


def test_three_class_metrics_match_a_hand_computed_case():
    from pneumonia.metrics.classification import ClassMetrics
    from pneumonia.metrics.intervals import class_intervals, weighted_class_metrics

    classes = ("NORMAL", "BACTERIA", "VIRUS")
    # true:      N  N  B  B  B  V  V
    # predicted: N  B  B  B  V  V  B   (arg-max of the rows below)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    probs = torch.tensor(
        [
            [0.8, 0.1, 0.1],
            [0.3, 0.6, 0.1],
            [0.1, 0.7, 0.2],
            [0.2, 0.5, 0.3],
            [0.1, 0.4, 0.5],
            [0.1, 0.3, 0.6],
            [0.2, 0.5, 0.3],
        ]
    )
    metrics = ClassMetrics(classes)
    metrics.update(probs, labels)
    v = metrics.compute()
    assert v["class_confusion_matrix"] == [[1, 1, 0], [0, 2, 1], [0, 1, 1]]
    assert v["class_accuracy"] == pytest.approx(4 / 7)
    # NORMAL: TP 1, FP 0, FN 1; BACTERIA: TP 2, FP 2, FN 1; VIRUS: TP 1, FP 1, FN 1.
    assert v["precision_NORMAL"] == pytest.approx(1.0)
    assert v["recall_NORMAL"] == pytest.approx(0.5)
    assert v["precision_BACTERIA"] == pytest.approx(0.5)
    assert v["recall_BACTERIA"] == pytest.approx(2 / 3)
    assert v["f1_BACTERIA"] == pytest.approx(4 / 7)
    assert v["f1_VIRUS"] == pytest.approx(0.5)
    assert v["macro_recall"] == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    # VIRUS against the rest: scores of the 2 viral images 0.6, 0.3 against 0.1 0.1 0.2 0.3
    # 0.5: 0.6 beats all 5; 0.3 beats 3 and ties 1 -> (5 + 3.5) / 10.
    assert v["auroc_VIRUS"] == pytest.approx(0.85)
    # The bootstrap's weighted figures with weights of one are the plain ones.
    plain = weighted_class_metrics(probs.double(), labels, classes, torch.ones(1, 7).double())
    for key in ("class_accuracy", "macro_f1", "recall_BACTERIA", "auroc_VIRUS", "macro_auroc"):
        assert float(plain[key][0]) == pytest.approx(v[key], abs=1e-6)
    ci = class_intervals(probs, labels, [str(i) for i in range(7)], classes, replicates=200)
    low, high = ci["class_accuracy"]
    assert 0.0 <= low <= 4 / 7 <= high <= 1.0
