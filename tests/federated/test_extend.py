"""`--resume RUN_DIR --federated.rounds N` (and `--trainer.max_epochs N`): a finished or
stopped run trained longer, exactly as a run planned that long, where the schedule allows it;
refused in one line where it does not. And the round state such runs leave: what an exact
resume needs, nothing twice."""

import csv
import json
import shutil

import pytest
import torch
import yaml
from test_federated_fit import FEDERATED, TINY

from pneumonia import fit
from pneumonia.core.errors import UserError
from pneumonia.federated.client import Client
from pneumonia.run.config import parse_fit_config
from pneumonia.run.rundir import check_resume_config, record_config

# Round rates that do not depend on the number of rounds; the last 2 rounds averaged.
CONSTANT = [*FEDERATED, "--federated.round_lr", "constant", "--federated.average_rounds", "2"]
TIMES = ("round_s", "elapsed_s")


def weights(run_dir, name="last.ckpt") -> dict:
    return torch.load(run_dir / "checkpoints" / name, weights_only=True)["state_dict"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def rounds_rows(run_dir) -> list[dict]:
    with open(run_dir / "rounds.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMES} for row in csv.DictReader(f)]


def assert_same_run(run_dir, reference) -> None:
    """The weights, best.ckpt (the average of the last rounds) and rounds.csv of `reference`."""
    assert_same_weights(weights(run_dir), weights(reference))
    assert_same_weights(weights(run_dir, "best.ckpt"), weights(reference, "best.ckpt"))
    assert rounds_rows(run_dir) == rounds_rows(reference)
    ours, theirs = (json.loads((d / "summary.json").read_text()) for d in (run_dir, reference))
    assert {k: v for k, v in ours.items() if k not in ("wall_time_s", "run_dir")} == {
        k: v for k, v in theirs.items() if k not in ("wall_time_s", "run_dir")
    }


@pytest.fixture(scope="module")
def short(tmp_path_factory):
    """A finished run of 2 rounds."""
    run_dir = tmp_path_factory.mktemp("short") / "run"
    fit.main([*CONSTANT, "--federated.rounds", "2", "--run_dir", str(run_dir)])
    return run_dir


@pytest.fixture(scope="module")
def long(tmp_path_factory):
    """The same run planned for 3 rounds: what a resume with one more round must give."""
    run_dir = tmp_path_factory.mktemp("long") / "run"
    fit.main([*CONSTANT, "--federated.rounds", "3", "--run_dir", str(run_dir)])
    return run_dir


def test_a_finished_run_given_more_rounds_is_the_run_planned_that_long(short, long, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(short, run_dir)
    summary = fit.main(["--resume", str(run_dir), "--federated.rounds", "3"])
    assert summary["federated"]["rounds"] == 3
    assert summary["selected_by"] == "mean of the global models of rounds 2-3"
    assert_same_run(run_dir, long)
    for config in (run_dir / "config.yaml", run_dir / "checkpoints" / "config.yaml"):
        assert yaml.safe_load(config.read_text())["federated"]["rounds"] == 3


def test_a_longer_resume_interrupted_continues_with_a_plain_resume(short, long, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(short, run_dir)
    original = Client.train_round

    def die_in_round_three(self, global_state, round_index, *args):
        if round_index == 2 and self.index == 1:
            raise KeyboardInterrupt
        return original(self, global_state, round_index, *args)

    with pytest.MonkeyPatch.context() as mp, pytest.raises(SystemExit) as stopped:
        mp.setattr(Client, "train_round", die_in_round_three)
        fit.main(["--resume", str(run_dir), "--federated.rounds", "3"])
    assert stopped.value.code == 130
    assert f"--resume {run_dir}" in capsys.readouterr().err
    fit.main(["--resume", str(run_dir)])  # config.yaml says 3 rounds now
    assert_same_run(run_dir, long)


def test_the_round_state_holds_the_global_model_once(short):
    """After the last of 2 rounds averaging 2: the global model, no float64 sum of rounds."""
    state = torch.load(short / "checkpoints" / "federated_state.pt", weights_only=True)
    assert "average_sum" not in state and state["average_models"] == {}
    assert state["planned_rounds"] == 2
    tensors = [v for v in state["server"]["global_state"].values()]
    assert all(v.dtype != torch.float64 for v in tensors)
    size = (short / "checkpoints" / "federated_state.pt").stat().st_size
    assert size < 1.2 * (short / "checkpoints" / "last.ckpt").stat().st_size


# -- what a resume may not lengthen: one line, before anything is read or written -------------


def recorded(tmp_path, argv: list[str]):
    """A run directory whose checkpoints were trained under `argv`'s config."""
    _, config_yaml, _ = parse_fit_config(argv)
    record_config(tmp_path, config_yaml)
    return tmp_path


def refusal(tmp_path, argv: list[str], longer: list[str]) -> str:
    run_dir = recorded(tmp_path, argv)
    _, config_yaml, _ = parse_fit_config([*argv, *longer])
    with pytest.raises(UserError) as refused:
        check_resume_config(run_dir, config_yaml)
    return str(refused.value)


ROUNDS_4 = ["--federated.rounds", "4"]


def test_more_rounds_of_a_cosine_round_rate_are_refused_saying_why(tmp_path):
    argv = [*FEDERATED, "--federated.rounds", "2", "--federated.round_lr", "cosine"]
    line = refusal(tmp_path, argv, ROUNDS_4)
    assert line == (
        f"{tmp_path} cannot resume with federated.rounds 2 -> 4: federated.round_lr cosine "
        f"decays over the planned 2 rounds, so more rounds would change the rates rounds 1-2 "
        f"trained at: start a new run with --federated.rounds 4 (a resume adds rounds under "
        f"round_lr constant, or a decay given optim.decay.decay_steps)"
    )


def test_more_rounds_under_a_spent_privacy_budget_are_refused(tmp_path):
    argv = [*CONSTANT, "--federated.rounds", "2", "--privacy.enabled", "true"]
    argv += ["--privacy.target_epsilon", "4", "--privacy.delta", "1e-3", "--data.balance", "none"]
    argv += ["--model.norm", "gn"]
    line = refusal(tmp_path, argv, ROUNDS_4)
    assert (
        "federated.rounds 2 -> 4: privacy.target_epsilon 4.0 set the noise for the planned" in line
    )
    assert "that budget is spent: start a new run with --federated.rounds 4" in line


def test_fewer_rounds_and_epochs_for_a_federation_are_refused(tmp_path):
    argv = [*CONSTANT, "--federated.rounds", "3"]
    assert "a resume can add rounds, not take them away" in refusal(
        tmp_path, argv, ["--federated.rounds", "2"]
    )
    line = refusal(tmp_path, argv, ["--trainer.max_epochs", "9"])
    assert "trains federated.local_epochs per round: raise federated.rounds" in line


CENTRAL = [*TINY, "--federated.enabled", "false", "--trainer.max_epochs", "2"]


@pytest.mark.parametrize(
    "schedule",
    [
        ["--optim.scheduler", "cosine"],
        ["--optim.scheduler", "onecycle"],
        ["--optim.scheduler", "exponential"],
        ["--optim.scheduler", "none", "--optim.weight_averaging", "swa"],
    ],
)
def test_more_epochs_of_a_planned_schedule_are_refused(tmp_path, schedule):
    line = refusal(tmp_path, [*CENTRAL, *schedule], ["--trainer.max_epochs", "4"])
    assert f"{tmp_path} cannot resume with trainer.max_epochs 2 -> 4: " in line
    assert line.endswith(")") or "start a new run with --trainer.max_epochs 4" in line


@pytest.mark.parametrize(
    ("argv", "longer"),
    [
        ([*CENTRAL, "--optim.scheduler", "none"], ["--trainer.max_epochs", "4"]),
        ([*CENTRAL, "--optim.scheduler", "step"], ["--trainer.max_epochs", "4"]),
        (
            [*CENTRAL, "--optim.scheduler", "cosine", "--optim.decay.decay_steps", "3"],
            ["--trainer.max_epochs", "4"],
        ),  # fmt: skip
        ([*CONSTANT, "--federated.rounds", "2"], ROUNDS_4),
        (
            [
                *FEDERATED,
                "--federated.rounds",
                "2",
                "--federated.round_lr",
                "exponential",
                "--optim.decay.decay_steps",
                "5",
            ],
            ROUNDS_4,
        ),  # fmt: skip
    ],
)
def test_more_epochs_or_rounds_where_the_rates_trained_stay_are_accepted(tmp_path, argv, longer):
    run_dir = recorded(tmp_path, argv)
    _, config_yaml, _ = parse_fit_config([*argv, *longer])
    key, value = longer[0][2:], longer[1]
    assert any(c.startswith(f"{key} ") and c.endswith(f"-> {value}") for c in
               check_resume_config(run_dir, config_yaml))  # fmt: skip


def test_resume_takes_more_rounds_or_epochs_and_nothing_else(short, capsys):
    cfg, _, resume = parse_fit_config(["--resume", str(short), "--federated.rounds", "7"])
    assert resume == short and cfg.federated.rounds == 7
    cfg, _, _ = parse_fit_config([f"--resume={short}", "--trainer.max_epochs=5"])
    assert cfg.trainer.max_epochs == 5 and cfg.federated.rounds == 2
    for extra in (["--seed", "3"], ["--federated.rounds"], ["--federated.rounds", "7", "x"]):
        with pytest.raises(UserError, match="--resume RUN_DIR takes no other options than"):
            parse_fit_config(["--resume", str(short), *extra])


def metrics_rows(run_dir) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_a_centralized_run_given_more_epochs_is_the_run_planned_that_long(tmp_path):
    argv = [*CENTRAL, "--optim.scheduler", "step", "--optim.step_size", "1"]
    two, one = tmp_path / "two", tmp_path / "one"
    fit.main([*argv, "--run_dir", str(two)])
    fit.main([*argv, "--trainer.max_epochs", "1", "--run_dir", str(one)])
    summary = fit.main(["--resume", str(one), "--trainer.max_epochs", "2"])
    assert summary["epochs"] == 2
    assert_same_weights(weights(one), weights(two))
    assert metrics_rows(one) == metrics_rows(two)


def test_a_run_without_the_record_of_its_training_config_is_not_trained_longer(tmp_path):
    """A run directory from before checkpoints/config.yaml was kept: more rounds are refused
    (nothing says which schedule the rounds done were trained under); a plain resume is not."""
    from pneumonia.run.rundir import check_resume_config

    written = "federated:\n  rounds: 2\n  round_lr: cosine\ntrainer:\n  max_epochs: 10\n"
    (tmp_path / "config.yaml").write_text(written)
    assert check_resume_config(tmp_path, written) == []
    with pytest.raises(UserError, match="cannot be trained longer: start a new run"):
        check_resume_config(tmp_path, written.replace("rounds: 2", "rounds: 4"))
