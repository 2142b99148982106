"""The embedded synthetic data is learnable but not trivial: a smaller centralized run learns."""

import pytest

from pneumonia import fit


@pytest.mark.slow
def test_small_synthetic_run_learns_beyond_the_majority_class(tmp_path):
    summary = fit.main(
        [
            "--data.image_size",
            "48",
            "--data.synthetic.n_patients",
            "400",
            "--model.width",
            "32",
            "--data.augment.enabled",
            "false",
            "--federated.enabled",
            "false",
            "--optim.scheduler",
            "cosine",
            "--trainer.max_epochs",
            "5",
            "--figures_every",
            "0",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.enable_model_summary",
            "false",
            "--run_dir",
            str(tmp_path / "run"),
        ]
    )
    val = summary["val"]
    (tn, fp), (fn, tp) = val["confusion_matrix"]
    majority = max(tn + fp, fn + tp) / val["n"]
    assert val["accuracy"] >= 0.7
    assert val["accuracy"] > majority + 0.1
    assert val["auroc"] >= 0.8
