"""Hostile or broken updates: the server's checks name the client they leave out, and the
robust aggregators match medians and trimmed means computed by hand."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from pneumonia import fit
from pneumonia.federated.aggregate import ClientUpdate, UpdateChecks, update_norm
from pneumonia.federated.options import FederatedConfig
from pneumonia.federated.server import ClientExcludedWarning, Server
from pneumonia.federated.strategies import FedAvg, Median, TrimmedMean, create_strategy

GLOBAL = {"w": torch.tensor([0.0, 0.0]), "count": torch.tensor(0)}


def update(client: int, w: list[float], n: int = 10, count: int = 1) -> ClientUpdate:
    state = {"w": torch.tensor(w), "count": torch.tensor(count)}
    return ClientUpdate(client, state, n, train_loss=0.5, train_accuracy=0.8)


def test_update_norm_by_hand():
    assert update_norm(update(0, [3.0, 4.0]), GLOBAL) == pytest.approx(5.0)  # integers skipped


def test_a_count_other_than_the_declared_one_is_left_out_by_name():
    checks = UpdateChecks(declared={0: 10, 1: 10})
    problems = checks.problems([update(0, [1.0, 0.0]), update(1, [1.0, 0.0], n=10**9)], GLOBAL)
    assert problems == {
        1: "it reports 1000000000 training images, but declared 10 when the run started"
    }


def test_an_update_ten_times_the_others_is_left_out_by_name():
    # Norms 1, 2 and 1e6: the third is 1e6 / median(1, 2) = 666,667 times the others'; the
    # first two are at most 2 / median(1, 1e6) times theirs.
    updates = [update(0, [1.0, 0.0]), update(1, [0.0, 2.0]), update(2, [1e6, 0.0])]
    problems = UpdateChecks(norm_ratio=10).problems(updates, GLOBAL)
    assert list(problems) == [2]
    assert problems[2].startswith("its update norm 1e+06 is 6.67e+05 x the median of the others'")
    assert UpdateChecks(norm_ratio=0).problems(updates, GLOBAL) == {}
    absolute = UpdateChecks(max_norm=1.5).problems(updates, GLOBAL)
    assert sorted(absolute) == [1, 2] and "exceeds federated.max_update_norm 1.5" in absolute[1]


def test_two_clients_one_hostile_the_honest_one_stays():
    updates = [update(0, [1.0, 0.0]), update(1, [1e6, 0.0])]
    assert list(UpdateChecks(norm_ratio=10).problems(updates, GLOBAL)) == [1]


def test_coordinate_wise_median_by_hand():
    # w[0]: 1, 5, 100 -> 5; w[1]: -2, 0, 7 -> 0; count: 1, 2, 9 -> 2
    updates = [update(0, [1.0, 7.0], count=1), update(1, [5.0, -2.0], count=9),
               update(2, [100.0, 0.0], count=2)]  # fmt: skip
    out = Median().aggregate(GLOBAL, updates)
    assert torch.equal(out["w"], torch.tensor([5.0, 0.0]))
    assert out["count"].item() == 2 and out["count"].dtype == torch.int64
    # Four clients: the mean of the two middle values. w[0]: 1, 5, 8, 100 -> 6.5
    out = Median().aggregate(GLOBAL, [*updates, update(3, [8.0, 1.0], count=4)])
    assert torch.equal(out["w"], torch.tensor([6.5, 0.5]))  # w[1]: -2, 0, 1, 7 -> 0.5
    assert out["count"].item() == 3  # 2, 4 -> 3


def test_trimmed_mean_by_hand():
    values = [1.0, 2.0, 3.0, 4.0, 100.0, -50.0, 5.0, 6.0, 7.0, 8.0]
    updates = [update(j, [v, float(j)]) for j, v in enumerate(values)]
    strategy = TrimmedMean(0.2)  # ceil(0.2 x 10) = 2 cut at each end
    assert strategy.trimmed(10) == 2
    out = strategy.aggregate(GLOBAL, updates)
    # w[0] sorted: -50 1 | 2 3 4 5 6 7 | 8 100 -> 27 / 6 = 4.5; w[1]: 0..9 -> 2..7 -> 4.5
    assert torch.allclose(out["w"], torch.tensor([4.5, 4.5]))
    assert TrimmedMean(0.1).trimmed(3) == 1  # three clients: the middle one
    assert TrimmedMean(0.0).trimmed(10) == 1  # at least one at each end
    assert TrimmedMean(0.4).trimmed(4) == 1  # two or more left between the cuts
    assert math.isclose(
        float(TrimmedMean(0.1).aggregate(GLOBAL, updates[:3])["w"][0]), 2.0
    )  # 1, 2, 3 -> 2


def test_the_robust_aggregators_are_in_the_registry():
    module = torch.nn.Linear(1, 1)
    assert isinstance(create_strategy(FederatedConfig(strategy="median"), module), Median)
    trimmed = create_strategy(FederatedConfig(strategy="trimmed_mean", trim_fraction=0.3), module)
    assert isinstance(trimmed, TrimmedMean) and trimmed.trim_fraction == 0.3


def test_the_server_warns_naming_the_scaled_client_and_averages_the_others():
    checks = UpdateChecks({0: 10, 1: 10, 2: 10}, 10)
    server = Server(
        GLOBAL, FedAvg(), n_clients=3, per_round=3, min_clients=1, seed=0, checks=checks
    )
    updates = [update(0, [1.0, 1.0]), update(1, [3.0, 3.0]), update(2, [1e6, 1e6])]
    with pytest.warns(ClientExcludedWarning, match="round 1: client 2 left out: its update norm"):
        assert server.aggregate(0, updates, {}) == [2]
    assert torch.equal(server.global_state["w"], torch.tensor([2.0, 2.0]))


TINY = [
    "--data.image_size", "32",
    "--data.synthetic.n_patients", "40",
    "--data.batch_size", "16",
    "--model.name", "resnet18",
    "--model.width", "16",
    "--trainer.enable_progress_bar", "false",
    "--federated.enabled", "true",
    "--federated.rounds", "2",
    "--federated.local_epochs", "1",
]  # fmt: skip


@pytest.mark.parametrize(
    ("hostile", "why"),
    [
        (["--federated.hostile.scale", "1e6"], "its update norm"),
        (["--federated.hostile.claimed_images", "1000000000"], "it reports 1000000000"),
    ],
)
def test_a_hostile_client_in_a_run_is_left_out_every_round(hostile, why, tmp_path):
    run_dir = tmp_path / "run"
    argv = [*TINY, "--federated.hostile.client", "1", *hostile, "--run_dir", str(run_dir)]
    with pytest.warns(ClientExcludedWarning) as caught:
        summary = fit.main(argv)
    messages = [str(w.message) for w in caught if w.category is ClientExcludedWarning]
    assert [m.split(":")[0] for m in messages] == ["round 1", "round 2"]
    assert all(f"client 1 left out: {why}" in m for m in messages)
    with (run_dir / "rounds.csv").open() as file:
        assert [row["excluded"] for row in csv.DictReader(file)] == ["1", "1"]
    assert summary["val"]["loss"] < 5  # the global model was never the hostile one


def test_without_the_checks_fedavg_is_taken_over_and_the_median_is_not(tmp_path):
    scaled = ["--federated.hostile.client", "1", "--federated.hostile.scale", "1e6",
              "--federated.update_norm_ratio", "0"]  # fmt: skip
    fit.main([*TINY, *scaled, "--run_dir", str(tmp_path / "fedavg")])
    median = [*scaled, "--federated.strategy", "median", "--run_dir", str(tmp_path / "median")]
    fit.main([*TINY, *median])

    def largest_weight(run: str) -> float:
        ckpt = torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=True)
        return max(v.abs().max().item() for v in ckpt["state_dict"].values())

    # One third of a 10^6-times update: weights near a thousand. The median keeps them at the
    # size an initialised and briefly trained network has (a few units).
    assert largest_weight("fedavg") > 100 * largest_weight("median")
