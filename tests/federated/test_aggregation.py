"""Aggregation against hand-computed averages; strategies; the server's checks and sampling."""

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from pneumonia.core.errors import UserError
from pneumonia.federated.aggregate import ClientUpdate, update_problem, weighted_average
from pneumonia.federated.options import FederatedConfig, clients_per_round
from pneumonia.federated.server import ClientExcludedWarning, Server
from pneumonia.federated.strategies import (
    FedAvg,
    ProximalTerm,
    create_strategy,
    normalization_keys,
)


def state(w: float, running: float, tracked: int) -> dict:
    return {
        "w": torch.tensor([w, 2 * w]),
        "bn.running_mean": torch.tensor([running]),
        "bn.num_batches_tracked": torch.tensor(tracked),
    }


def update(client: int, n: int, **kw) -> ClientUpdate:
    return ClientUpdate(client, state(**kw), n, train_loss=0.5, train_accuracy=0.8)


def test_weighted_average_by_hand_integer_buffers_included():
    # weights 1, 3: w = (1*1 + 3*3)/4 = 2.5; running = (1*4 + 3*0)/4 = 1; tracked = (1*10 +
    # 3*13)/4 = 12.25 -> 12, and (1*1 + 3*2)/4 = 1.75 -> 2 (rounded half up).
    avg = weighted_average([state(1.0, 4.0, 10), state(3.0, 0.0, 13)], [1, 3])
    assert torch.allclose(avg["w"], torch.tensor([2.5, 5.0]))
    assert torch.allclose(avg["bn.running_mean"], torch.tensor([1.0]))
    assert avg["bn.num_batches_tracked"].item() == 12
    assert avg["bn.num_batches_tracked"].dtype == torch.int64
    rounded = weighted_average([state(0.0, 0.0, 1), state(0.0, 0.0, 2)], [1, 3])
    assert rounded["bn.num_batches_tracked"].item() == 2
    half = weighted_average([state(0.0, 0.0, 1), state(0.0, 0.0, 2)], [1, 1])
    assert half["bn.num_batches_tracked"].item() == 2  # 1.5 rounds up


def test_single_client_average_is_bit_exact():
    s = {"w": torch.randn(5, 3)}
    assert torch.equal(weighted_average([s], [17])["w"], s["w"])


def test_update_problems_are_named():
    ref = state(0.0, 0.0, 0)
    assert update_problem(update(0, 5, w=1.0, running=1.0, tracked=1), ref) is None
    bad = update(0, 5, w=1.0, running=1.0, tracked=1)
    bad.state["w"] = torch.tensor([float("nan"), 1.0])
    assert "non-finite" in update_problem(bad, ref)
    bad.state["w"] = torch.zeros(3)
    assert "shape" in update_problem(bad, ref)
    bad.state["w"] = torch.zeros(2, dtype=torch.float64)
    assert "dtype" in update_problem(bad, ref)
    del bad.state["w"]
    assert "missing keys ['w']" in update_problem(bad, ref)
    bad.state["w"], bad.state["extra"] = torch.zeros(2), torch.zeros(1)
    assert "extra keys ['extra']" in update_problem(bad, ref)
    assert "0 training images" in update_problem(update(0, 0, w=1.0, running=1.0, tracked=1), ref)


def make_server(min_clients=1, per_round=3, n_clients=3, strategy=None):
    return Server(
        state(0.0, 0.0, 0),
        strategy or FedAvg(),
        n_clients=n_clients,
        per_round=per_round,
        min_clients=min_clients,
        seed=0,
    )


def test_the_server_takes_its_counts_by_name():
    # Four ints in a row are easily swapped: clients, per round, minimum and seed.
    with pytest.raises(TypeError, match="positional"):
        Server(state(0.0, 0.0, 0), FedAvg(), 3, 3, 1, 0)


def test_server_leaves_out_nan_and_failed_clients_with_a_warning():
    server = make_server()
    nan = update(2, 5, w=float("nan"), running=0.0, tracked=1)
    with pytest.warns(ClientExcludedWarning) as caught:
        excluded = server.aggregate(
            0, [update(0, 1, w=1.0, running=4.0, tracked=10), nan], {1: "raised RuntimeError"}
        )
    assert excluded == [1, 2]
    messages = sorted(str(w.message) for w in caught)
    assert messages[0] == "round 1: client 1 left out: raised RuntimeError"
    assert messages[1].startswith("round 1: client 2 left out: w holds non-finite")
    assert torch.allclose(server.global_state["w"], torch.tensor([1.0, 2.0]))  # client 0 only


def test_round_fails_below_min_clients_and_keeps_the_global_state():
    server = make_server(min_clients=2)
    before = {k: v.clone() for k, v in server.global_state.items()}
    with pytest.warns(ClientExcludedWarning), pytest.raises(UserError, match="min_clients is 2"):
        server.aggregate(4, [update(0, 3, w=1.0, running=0.0, tracked=1)], {1: "raised X"})
    assert all(torch.equal(before[k], v) for k, v in server.global_state.items())


def test_min_clients_above_the_sample_size_is_refused():
    with pytest.raises(UserError, match="min_clients 3 is more than the 2 client"):
        make_server(min_clients=3, per_round=2)


def test_sampling_is_seeded_and_sized_by_fraction():
    assert clients_per_round(0.3, 10) == 3 and clients_per_round(0.01, 10) == 1
    a, b = make_server(per_round=3, n_clients=10), make_server(per_round=3, n_clients=10)
    draws = [a.sample_clients() for _ in range(4)]
    assert draws == [b.sample_clients() for _ in range(4)]
    assert all(len(set(d)) == 3 and max(d) < 10 for d in draws)
    assert len({tuple(d) for d in draws}) > 1


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)


def test_normalization_keys_are_the_norm_layers_state():
    assert normalization_keys(TinyNet()) == {
        "bn.weight",
        "bn.bias",
        "bn.running_mean",
        "bn.running_var",
        "bn.num_batches_tracked",
        "gn.weight",
        "gn.bias",
    }
    fedbn = create_strategy(FederatedConfig(strategy="fedbn"), TinyNet())
    assert "conv.weight" not in fedbn.local_keys and "bn.running_mean" in fedbn.local_keys


def test_proximal_term_adds_mu_times_the_distance_to_the_global_weights():
    net = nn.Linear(2, 1, bias=False)
    net.weight.data = torch.tensor([[1.0, 3.0]])
    net.weight.grad = torch.tensor([[0.5, 0.5]])
    anchor = {"weight": torch.tensor([[0.0, 1.0]])}
    ProximalTerm(0.1, anchor).on_before_optimizer_step(None, net, None)
    # grad + mu (w - w_global) = [0.5 + 0.1, 0.5 + 0.2]
    assert torch.allclose(net.weight.grad, torch.tensor([[0.6, 0.7]]))


def test_fedavgm_without_momentum_at_lr_1_is_fedavg():
    cfg = FederatedConfig(strategy="fedavgm", server_lr=1.0, server_momentum=0.0)
    strategy = create_strategy(cfg, nn.Linear(2, 1, bias=False))
    start = {"weight": torch.tensor([[1.0, 1.0]])}
    ups = [ClientUpdate(0, {"weight": torch.tensor([[3.0, -1.0]])}, 1, 0.0, 0.0)]
    assert torch.allclose(strategy.aggregate(start, ups)["weight"], torch.tensor([[3.0, -1.0]]))


def test_fedadam_first_step_by_hand():
    # Adam's first step with bias correction: w - lr * g / (|g| + eps), g = global - average.
    cfg = FederatedConfig(strategy="fedadam", server_lr=0.1)
    strategy = create_strategy(cfg, nn.Linear(1, 1, bias=False))
    start = {"weight": torch.tensor([[1.0]])}
    ups = [ClientUpdate(0, {"weight": torch.tensor([[0.0]])}, 1, 0.0, 0.0)]
    out = strategy.aggregate(start, ups)["weight"].item()
    assert out == pytest.approx(1.0 - 0.1 * 1.0 / (1.0 + 1e-3), rel=1e-5)
    saved = strategy.state_dict()
    assert saved["state"][0]["step"].item() == 1  # the server optimizer state is saved


SERVER_SIDE = ["server.py", "strategies.py", "aggregate.py"]


@pytest.mark.parametrize("name", SERVER_SIDE)
def test_server_side_code_imports_no_data_module(name):
    path = Path(__file__).parents[2] / "pneumonia" / "federated" / name
    tree = ast.parse(path.read_text())
    imported = [
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    ]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert imported and not [m for m in imported if m.startswith("pneumonia.data")]


def test_round_learning_rate_schedule_by_hand():
    from pneumonia.federated.options import round_lr_scale

    assert [round_lr_scale("constant", r, 4) for r in range(4)] == [1.0] * 4
    # 0.5 (1 + cos(pi r / 4)) for r = 0..3: 1, 0.854, 0.5, 0.146
    expected = [1.0, 0.8535534, 0.5, 0.1464466]
    assert [round_lr_scale("cosine", r, 4) for r in range(4)] == pytest.approx(expected)


def test_a_new_strategy_is_one_class_and_one_registry_line(monkeypatch):
    from pneumonia.federated import strategies
    from pneumonia.federated.options import check_federated

    # A copy of the entries, so the new name is gone after the test.
    registry = strategies.STRATEGIES
    monkeypatch.setattr(registry, "_entries", dict(registry._entries))

    @registry.register("halfway")
    class Halfway(strategies.Strategy):
        """Moves the global model half way to the clients' average."""

        def aggregate(self, global_state, updates):
            average = super().aggregate(global_state, updates)
            return {k: (global_state[k] + average[k]) / 2 for k in average}

    cfg = FederatedConfig(strategy="halfway")
    check_federated(cfg)  # known by name, with no other file touched
    strategy = create_strategy(cfg, nn.Linear(1, 1, bias=False))
    update = ClientUpdate(0, {"weight": torch.full((1, 1), 4.0)}, 3, 0.5, 0.5)
    assert strategy.aggregate({"weight": torch.zeros(1, 1)}, [update])["weight"].item() == 2.0
    with pytest.raises(UserError, match="unknown federated.strategy 'nope': choose one of"):
        check_federated(FederatedConfig(strategy="nope"))
