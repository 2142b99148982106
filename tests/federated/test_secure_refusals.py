"""What federated.secure_aggregation refuses, before any image is read: strategies and server
DP that need each update on its own, fewer than three clients, and a run without Flower."""

from __future__ import annotations

from pathlib import Path

import pytest

from pneumonia import fit
from pneumonia.core.errors import UserError
from pneumonia.federated.options import FederatedConfig, ServerDPConfig, check_federated

DEFAULT = str(Path(__file__).resolve().parents[2] / "configs" / "default.yaml")


def secure(**fields) -> FederatedConfig:
    return FederatedConfig(enabled=True, secure_aggregation=True, **fields)


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedbn", "fedavgm", "fedadam"])
def test_the_averaging_strategies_are_accepted(strategy):
    check_federated(secure(strategy=strategy, clients=3))


@pytest.mark.parametrize("strategy", ["median", "trimmed_mean"])
def test_the_robust_strategies_are_refused(strategy):
    with pytest.raises(UserError, match=f"federated.strategy {strategy} needs them one by one"):
        check_federated(secure(strategy=strategy))


def test_server_dp_is_refused():
    with pytest.raises(UserError, match="federated.server_dp clips each update"):
        check_federated(secure(server_dp=ServerDPConfig(enabled=True, delta=0.01)))


def test_fewer_than_three_clients_are_refused():
    with pytest.raises(
        UserError, match=r"at least 3 clients per round .*clients 2 x fraction 1 gives 2"
    ):
        check_federated(secure(clients=2))


def test_fewer_than_three_clients_per_round_are_refused():
    with pytest.raises(UserError, match=r"clients 5 x fraction 0.4 gives 2"):
        check_federated(secure(clients=5, fraction=0.4))


def test_a_run_without_flower_is_refused_before_reading_images(tmp_path):
    argv = ["--config", DEFAULT, "--runs_root", str(tmp_path), "--model.width", "16"]
    argv += ["--data.image_size", "32", "--federated.secure_aggregation", "true"]
    with pytest.raises(UserError, match="federated.secure_aggregation runs over the Flower"):
        fit.run(argv)
    assert not any(tmp_path.iterdir())  # no run directory
