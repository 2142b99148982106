"""How a run ends: early stopping by epoch (Lightning's EarlyStopping) and by round (the
same rule), a diverged loss reported as such, and learning-rate decays stepped by round."""

from __future__ import annotations

import csv
import json
import math
from types import SimpleNamespace

import pytest
import torch

from pneumonia import fit
from pneumonia.federated.options import round_lr_scale
from pneumonia.run.centralized import Divergence
from pneumonia.run.stopping import rounds_without_improvement
from pneumonia.training.schedules import DecayConfig

TINY = [
    "--figures_every", "0",  # TensorBoard figures: the reported model's only
    "--data.image_size", "32",
    "--data.synthetic.n_patients", "30",
    "--data.batch_size", "16",
    "--model.width", "16",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
    "--trainer.log_every_n_steps", "1",
    "--monitor", "val/loss",
]  # fmt: skip
# No improvement can beat a min_delta of 100 in log loss: every run stops after patience + 1.
NEVER_BETTER = ["--early_stopping.patience", "1", "--early_stopping.min_delta", "100"]


def test_early_stopping_ends_a_centralized_run_and_says_so(tmp_path):
    run_dir = tmp_path / "run"
    argv = [*TINY, "--federated.enabled", "false", "--trainer.max_epochs", "5", *NEVER_BETTER]
    summary = fit.main([*argv, "--run_dir", str(run_dir)])
    assert summary["epochs"] == 2
    assert summary["early_stopping"] == {
        "monitor": "val/loss",
        "patience": 1,
        "min_delta": 100.0,
        "unit": "epoch",
        "stopped_after": 2,
    }
    written = json.loads((run_dir / "summary.json").read_text())
    assert written["early_stopping"]["stopped_after"] == 2


def test_early_stopping_by_round_ends_a_federation_and_says_so(tmp_path, capsys):
    run_dir = tmp_path / "run"
    federated = ["--federated.enabled", "true", "--federated.rounds", "5"]
    argv = [*TINY, *federated, "--federated.local_epochs", "1", *NEVER_BETTER]
    summary = fit.main([*argv, "--run_dir", str(run_dir)])
    with open(run_dir / "rounds.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    assert summary["federated"]["rounds"] == 2
    assert summary["early_stopping"]["unit"] == "round"
    assert summary["early_stopping"]["stopped_after"] == 2
    assert "early stopping after round 2: val/loss has not improved" in capsys.readouterr().out


def test_a_stopped_federation_resumed_trains_no_further_round(tmp_path, capsys):
    """Killed after early stopping (in the post-training steps), the run resumes from its last
    round checkpoint: it must stop there again, not train the round it had stopped before."""
    run_dir = tmp_path / "run"
    federated = ["--federated.enabled", "true", "--federated.rounds", "5"]
    fit.main([*TINY, *federated, "--federated.local_epochs", "1", *NEVER_BETTER,
              "--run_dir", str(run_dir)])  # fmt: skip
    (run_dir / "summary.json").unlink()  # as if killed before the summary was written
    capsys.readouterr()
    summary = fit.main(["--resume", str(run_dir)])
    with open(run_dir / "rounds.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    assert summary["federated"]["rounds"] == 2
    assert summary["early_stopping"]["stopped_after"] == 2
    out = capsys.readouterr().out
    assert "round 3/5" not in out
    assert "early stopping after round 2" in out


def test_a_stopped_centralized_run_resumed_trains_no_further_epoch(tmp_path):
    run_dir = tmp_path / "run"
    argv = [*TINY, "--federated.enabled", "false", "--trainer.max_epochs", "5", *NEVER_BETTER]
    fit.main([*argv, "--run_dir", str(run_dir)])
    (run_dir / "summary.json").unlink()
    summary = fit.main(["--resume", str(run_dir)])
    assert summary["epochs"] == 2
    assert summary["early_stopping"]["stopped_after"] == 2


@pytest.mark.parametrize(
    "values,mode,delta,stale",
    [
        ([0.5, 0.4, 0.45, 0.41], "min", 0.0, 2),  # best 0.4 at the 2nd value: 2 after it
        ([0.5, 0.4, 0.45, 0.39], "min", 0.0, 0),
        ([0.5, 0.4, 0.45, 0.39], "min", 0.02, 2),  # 0.39 beats 0.4 by 0.01 only
        ([0.7, 0.8, 0.8], "max", 0.0, 1),
        ([0.5, math.nan, math.nan], "min", 0.0, 2),  # NaN never improves
    ],
)
def test_rounds_without_improvement_counts_as_lightning_does(values, mode, delta, stale):
    assert rounds_without_improvement(values, mode, delta) == stale


def test_early_stopping_with_an_average_of_the_last_rounds_is_refused(capsys):
    argv = [*TINY, "--federated.enabled", "true", "--federated.average_rounds", "2"]
    with pytest.raises(SystemExit) as err:
        fit.main([*argv, "--early_stopping.patience", "2"])
    assert err.value.code == 2
    assert "early_stopping.patience with federated.average_rounds" in capsys.readouterr().err


def test_a_non_finite_training_loss_stops_the_fit_and_is_recorded():
    divergence = Divergence()
    trainer = SimpleNamespace(current_epoch=2, should_stop=False)
    divergence.on_train_batch_end(trainer, None, {"loss": torch.tensor(0.3)}, None, 0)
    assert not trainer.should_stop and divergence.epoch is None
    divergence.on_train_batch_end(trainer, None, {"loss": torch.tensor(math.nan)}, None, 1)
    assert trainer.should_stop and divergence.epoch == 3


def test_a_diverging_run_is_reported_as_diverged_not_dropped(tmp_path):
    run_dir = tmp_path / "run"
    argv = [*TINY, "--federated.enabled", "false", "--trainer.max_epochs", "2"]
    argv += ["--optim.name", "sgd", "--optim.lr", "1e12", "--optim.weight_decay", "0"]
    summary = fit.main([*argv, "--run_dir", str(run_dir)])
    assert summary["diverged"] is True and summary["diverged_in_epoch"] == 1
    written = json.loads((run_dir / "summary.json").read_text())
    assert written["diverged"] is True


@pytest.mark.parametrize(
    "name,decay,expected",
    [
        ("exponential", {"decay_rate": 0.1}, lambda t: 0.1 ** (t / 10)),
        ("inverse_time", {"decay_rate": 9.0}, lambda t: 1 / (1 + 9.0 * t / 10)),
        ("polynomial", {"power": 2.0}, lambda t: (1 - t / 10) ** 2),
        ("cosine", {}, lambda t: 0.5 * (1 + math.cos(math.pi * t / 10))),
    ],
)
def test_round_decays_follow_tensorflows_formulas_by_round(name, decay, expected):
    for t in (0, 3, 9):
        factor = round_lr_scale(name, t, 10, DecayConfig(**decay))
        assert factor == pytest.approx(expected(t), rel=1e-12)
