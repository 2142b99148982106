"""federated.average_rounds: the warning when the average takes in most of the run, and what
the round state keeps of the averaged rounds (only what an exact resume needs)."""

import io
import logging

import pytest
import torch

from pneumonia.core.errors import UserError
from pneumonia.federated.options import FederatedConfig, check_federated
from pneumonia.run.averaging import RoundAverage


def warnings_of(caplog, fed: FederatedConfig) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pneumonia"):
        check_federated(fed)
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_an_average_over_most_of_the_run_is_warned_in_one_line(caplog):
    # A schedule shortened below average_rounds (a shipped config's 3 with --federated.rounds 2)
    lines = warnings_of(caplog, FederatedConfig(rounds=2, average_rounds=3))
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith("federated.average_rounds 3 covers 2 of the 2 federated.rounds")
    assert "mean of rounds 1-2" in lines[0] and "at most 1" in lines[0]
    assert len(warnings_of(caplog, FederatedConfig(rounds=5, average_rounds=3))) == 1


@pytest.mark.parametrize(("rounds", "average"), [(12, 3), (20, 5), (10, 2), (4, 2), (1, 3), (2, 0)])
def test_the_shipped_averages_and_a_single_round_are_not_warned(caplog, rounds, average):
    assert warnings_of(caplog, FederatedConfig(rounds=rounds, average_rounds=average)) == []


def global_models(rounds: int, seed: int = 0) -> list[dict]:
    """Round r's global model (index r - 1): float weights and an integer buffer."""
    g = torch.Generator().manual_seed(seed)
    return [
        {"w": torch.randn(5, 3, generator=g), "n": torch.tensor(r, dtype=torch.long)}
        for r in range(1, rounds + 1)
    ]


def running_sum_mean(models: list[dict], k: int) -> dict:
    """The mean as the round state's float64 running sum gave it."""
    total = {key: v.double().clone() for key, v in models[-k].items()}
    for state in models[-k + 1 :]:
        for key, v in state.items():
            total[key] += v.double()
    return {
        key: (total[key] / k).to(v.dtype) if v.is_floating_point() else v
        for key, v in models[-1].items()
    }


def saved_and_loaded(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_an_average_resumed_after_any_round_gives_the_same_bits():
    fed = FederatedConfig(rounds=6, average_rounds=3)
    models = global_models(6)
    expected = running_sum_mean(models, 3)
    for stop in range(1, 7):  # killed after round `stop`, then resumed to the end
        before = RoundAverage(fed)
        for r in range(1, stop + 1):
            before.add(r, models[r - 1])
        saved = saved_and_loaded(before.state_dict(stop))
        resumed = RoundAverage(fed)
        resumed.load_state_dict(saved, stop, models[stop - 1], planned=6)
        for r in range(stop + 1, 7):
            resumed.add(r, models[r - 1])
        if stop < 6:  # after the last round the mean is written already: nothing recomputes it
            mean = resumed.mean(models[-1])
            assert torch.equal(mean["w"], expected["w"]) and mean["w"].dtype == torch.float32
            assert torch.equal(mean["n"], models[-1]["n"])
    assert torch.equal(before.mean(models[-1])["w"], expected["w"])


def test_the_round_state_keeps_the_window_but_the_latest_and_after_the_last_round_less():
    fed = FederatedConfig(rounds=5, average_rounds=3)
    average = RoundAverage(fed)
    kept = {}
    for r, state in enumerate(global_models(5), 1):
        average.add(r, state)
        kept[r] = sorted(average.state_dict(r)["average_models"])
    # Rounds 3-5 are averaged; the latest is the server's own global state, saved beside.
    assert kept == {1: [], 2: [], 3: [], 4: [3], 5: [4]}
    state = average.state_dict(5)
    assert "average_sum" not in state
    assert all(
        v.dtype != torch.float64 for m in state["average_models"].values() for v in m.values()
    )


def one_more_round(models: list[dict], average: int) -> RoundAverage:
    """A finished run of len(models) - 1 rounds averaging `average`, resumed with one more."""
    done = len(models) - 1
    short = RoundAverage(FederatedConfig(rounds=done, average_rounds=average))
    for r, state in enumerate(models[:done], 1):
        short.add(r, state)
    longer = RoundAverage(FederatedConfig(rounds=done + 1, average_rounds=average))
    saved = saved_and_loaded(short.state_dict(done))
    longer.load_state_dict(saved, done, models[done - 1], planned=done)
    longer.add(done + 1, models[done])
    return longer


def test_more_rounds_move_the_window_over_the_models_kept():
    """A run of 5 rounds averaging 3, resumed with 6: the mean of rounds 4-6."""
    models = global_models(6)
    longer = one_more_round(models, 3)
    assert longer.complete(6)
    assert torch.equal(longer.mean(models[5])["w"], running_sum_mean(models, 3)["w"])


def test_a_round_state_with_the_running_sum_still_resumes_but_cannot_move_its_window():
    models = global_models(4)
    legacy = {"average_sum": {k: v.double() for k, v in models[2].items()}}  # after round 3 of 4
    average = RoundAverage(FederatedConfig(rounds=4, average_rounds=2))
    average.load_state_dict(saved_and_loaded(legacy), 3, models[2], planned=4)
    average.add(4, models[3])
    assert torch.equal(average.mean(models[3])["w"], running_sum_mean(models, 2)["w"])
    assert "average_sum" in average.state_dict(4)
    longer = RoundAverage(FederatedConfig(rounds=6, average_rounds=2))
    with pytest.raises(UserError, match="federated.rounds 4 -> 6: this run's round state keeps"):
        longer.load_state_dict(saved_and_loaded(legacy), 3, models[2], planned=4)


def test_an_average_over_more_rounds_than_the_run_keeps_every_round_for_a_longer_resume():
    """K = 5 over a finished run of 3 averages rounds 1-3; given a 4th round it averages 1-4."""
    models = global_models(4)
    longer = one_more_round(models, 5)
    assert torch.equal(longer.mean(models[3])["w"], running_sum_mean(models, 4)["w"])


def test_a_resume_stopped_inside_a_longer_plan_must_keep_that_plan(tmp_path, monkeypatch):
    """Planned 14 rounds, stopped after 12: resuming with 13 would lose round 11's model."""
    from argparse import Namespace

    from pneumonia.run import rounds as rounds_module

    state = {"round": 12, "planned_rounds": 14, "fingerprint": "f"}
    monkeypatch.setattr(rounds_module, "load_round_state", lambda run_dir: state)
    record = rounds_module.RoundRecord.__new__(rounds_module.RoundRecord)
    record.run_dir, record.fingerprint = tmp_path, "f"
    record.cfg = Namespace(federated=FederatedConfig(rounds=13, average_rounds=3))
    with pytest.raises(UserError, match="stopped after round 12 of 14 planned: resume with "):
        record.saved_state()
    record.cfg = Namespace(federated=FederatedConfig(rounds=14, average_rounds=3))
    assert record.saved_state() is state
