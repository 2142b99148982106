"""Secure aggregation's glue, in this process: `FlowerCohort.secure_train_round` over a fake
Grid whose three nodes run a ClientApp with the package's `secure_aggregation` mod around
Flower's `secaggplus_mod` (keys, shares and masks are Flower's own), and a train handler that
returns known updates. Every stage's dropout, a count liar, a non-finite update, too few nodes
left, and what `Server.aggregate_secure` makes of each. (tests/flower/test_secure.py runs the
real thing over loopback processes.)"""

from __future__ import annotations

import copy
import uuid
import warnings

import numpy as np
import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.supercore.task_identity import TaskIdentity

from pneumonia.core.errors import UserError
from pneumonia.federated.aggregate import ClientUpdate, UpdateChecks, weighted_average
from pneumonia.federated.cohort import RoundTask
from pneumonia.federated.server import SecureRound, Server
from pneumonia.federated.strategies import FedAvg, FedAvgM
from pneumonia.flower import client_app, node, secure, wire
from pneumonia.flower.cohort import FlowerCohort
from pneumonia.training.recipe import Recipe

NODES = {101: 10, 102: 30, 103: 60}  # node id -> images (clients 0, 1, 2)
START = {"w": torch.randn(6, 5), "b": torch.randn(7), "steps": torch.tensor(4)}


def trained(node_id: int) -> dict:
    g = torch.Generator().manual_seed(node_id)
    state = {
        k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in START.items() if k != "steps"
    }
    return state | {"steps": START["steps"] + 2}


class Behaviour:
    """What the fake nodes do wrong: stop answering at a stage, lie, send NaN."""

    def __init__(self) -> None:
        self.silent: dict[int, str] = {}  # node -> first stage it no longer answers
        self.claims: dict[int, int] = {}  # node -> the image count it reports
        self.nan: set[int] = set()


def fake_app(behaviour: Behaviour) -> ClientApp:
    app = ClientApp(mods=[client_app.secure_aggregation])

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        n = NODES[context.node_id]
        info = wire.NodeInfo(str(context.node_id), (n, 0.5, 0.3), "00", {"images": n})
        return Message(wire.query_reply(info), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        node_id = context.node_id
        request = wire.read_train_request(msg.content)
        state = trained(node_id)
        if node_id in behaviour.nan:
            state["w"][0, 0] = float("nan")
        n = behaviour.claims.get(node_id, NODES[node_id])
        update = ClientUpdate(request.client, state, n, 0.5, 0.75, epsilon=1.25)
        if RECORD_KEY_CONFIGS in msg.content.config_records:
            return Message(wire.secure_train_reply(update, request.task.global_state), reply_to=msg)
        return Message(wire.train_reply(update), reply_to=msg)

    return app


class FakeGrid:
    """Push runs each message through its node's ClientApp at once; a node that has gone
    silent gets the error reply the SuperLink makes for a node that is no longer there."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.app, self.behaviour = fake_app(behaviour), behaviour
        self.contexts = {n: Context(1, n, {}, RecordDict(), {}) for n in NODES}
        self.gone: set[int] = set()
        self.replies: dict[str, Message] = {}

    def get_node_ids(self):
        return list(NODES)

    def push_messages(self, messages):
        return [self.deliver(m) for m in messages]

    def deliver(self, message: Message) -> str:
        # A copy, as the wire makes one (secaggplus_mod pops from what it is given).
        node_id = message.metadata.dst_node_id
        copied = Message(
            copy.deepcopy(message.content),
            dst_node_id=node_id,
            message_type=message.metadata.message_type,
            group_id=message.metadata.group_id,
        )
        copied.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        records = copied.content.config_records
        stage = records[RECORD_KEY_CONFIGS][Key.STAGE] if RECORD_KEY_CONFIGS in records else ""
        if self.behaviour.silent.get(node_id) == stage:
            self.gone.add(node_id)
        if node_id in self.gone:
            reply = Message(Error(0, "node unavailable"), reply_to=copied)
        else:
            try:
                reply = self.app(copied, self.contexts[node_id])
            except Exception as err:  # the ClientApp's error reply
                reply = Message(Error(1, f"{type(err).__name__}: {err}"), reply_to=copied)
        self.replies[copied.metadata.message_id] = reply
        return copied.metadata.message_id

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in message_ids if i in self.replies]


@pytest.fixture(autouse=True)
def task_identity():
    """Messages made outside a Flower process need a task identity (the ServerApp has one)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id = TaskIdentity._node_id = TaskIdentity._task_id = None


def secure_round(behaviour: Behaviour | None = None) -> SecureRound:
    cohort = FlowerCohort(FakeGrid(behaviour or Behaviour()), "seed: 0\n", 3, 1, 5)
    cohort.start(Recipe(model={"name": "x"}, optim={"lr": 0.1}, image_size=32, mean=0.5), None)
    return cohort.secure_train_round([0, 1, 2], RoundTask(START, 0, 1, 0.1))


def plain(clients: list[int]) -> dict:
    nodes = sorted(NODES)
    states = [trained(nodes[j]) for j in clients]
    return weighted_average(states, [NODES[nodes[j]] for j in clients])


def error(result: SecureRound, clients: list[int]) -> float:
    return max(float((result.aggregate[k] - plain(clients)[k]).abs().max()) for k in ["w", "b"])


def tolerance(clients: list[int]) -> float:
    """k x (2C / Q) x max_weight / sum(n), + float32 rounding; max_weight is the largest count
    the round's nodes declared (dropped ones too: it is fixed before anyone drops)."""
    counts = [NODES[sorted(NODES)[j]] for j in clients]
    quantum = 2 * secure.DEFAULT_CLIPPING_RANGE / 2**22
    return len(counts) * quantum * max(NODES.values()) / sum(counts) + 1e-6


def test_all_present_the_server_gets_the_weighted_average_and_clear_metadata():
    result = secure_round()
    assert result.failures == {} and result.halted == ""
    expected = [(0, 10, {}), (1, 30, {}), (2, 60, {})]
    assert [(u.client, u.n, u.state) for u in result.updates] == expected
    assert all(u.train_loss == 0.5 and u.epsilon == 1.25 for u in result.updates)
    assert error(result, [0, 1, 2]) <= tolerance([0, 1, 2])
    assert torch.equal(result.aggregate["steps"], START["steps"])  # integers: the global's


@pytest.mark.parametrize(
    ("stage", "member"),
    [("setup", False), ("share_keys", False), ("collect_masked_vectors", False), ("unmask", True)],
)
def test_one_node_dropping_out_at_any_stage_leaves_the_round_to_the_others(stage, member):
    """Before its masked vector arrives, a node is left out (its masks removed); after, in
    the unmask stage, its update is in the sum and its own mask is rebuilt from shares."""
    behaviour = Behaviour()
    behaviour.silent[103] = stage
    result = secure_round(behaviour)
    clients = [0, 1, 2] if member else [0, 1]
    assert [u.client for u in result.updates] == clients
    assert error(result, clients) <= tolerance(clients)
    if not member:
        assert list(result.failures) == [2] and stage in result.failures[2]


def test_a_node_reporting_another_count_than_it_declared_is_left_out():
    behaviour = Behaviour()
    behaviour.claims[101] = 10_000
    result = secure_round(behaviour)
    assert [u.client for u in result.updates] == [1, 2]
    assert "10000 training images" in result.failures[0] and "declared 10" in result.failures[0]
    assert error(result, [1, 2]) <= tolerance([1, 2])


def test_a_non_finite_update_never_leaves_its_node():
    behaviour = Behaviour()
    behaviour.nan.add(102)
    result = secure_round(behaviour)
    assert [u.client for u in result.updates] == [0, 2]
    assert "non-finite" in result.failures[1]


def test_below_the_reconstruction_threshold_the_round_fails_and_can_resume():
    behaviour = Behaviour()
    behaviour.silent |= {102: "collect_masked_vectors", 103: "collect_masked_vectors"}
    result = secure_round(behaviour)
    assert result.aggregate is None and sorted(result.failures) == [1, 2]
    server = Server(START, FedAvg(), n_clients=3, per_round=3, min_clients=1, seed=0)
    with (
        pytest.raises(UserError, match="reconstruction threshold 2") as err,
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        server.aggregate_secure(0, result)
    assert str(err.value).startswith("round 1 failed: secure aggregation halted: 1 of 3")
    assert "--resume" in str(err.value) and torch.equal(server.global_state["w"], START["w"])


def test_fewer_than_three_clients_a_round_are_refused():
    cohort = FlowerCohort(FakeGrid(Behaviour()), "seed: 0\n", 3, 1, 5)
    with pytest.raises(UserError, match="raise federated.fraction"):
        cohort.secure_train_round([0, 2], RoundTask(START, 0, 1, 0.1))


def test_protocol_shares_tolerate_a_minority_of_dropouts():
    assert secure.protocol_shares(3) == (3, 2)
    assert secure.protocol_shares(5) == (5, 3)
    assert secure.protocol_shares(10) == (10, 6)


# -- Server.aggregate_secure ------------------------------------------------------------------


def members(*counts: int) -> list[ClientUpdate]:
    return [ClientUpdate(j, {}, n, 0.5, 0.5) for j, n in enumerate(counts)]


def test_the_strategy_gets_one_update_the_aggregate():
    mean = {k: v + 0.5 if v.is_floating_point() else v for k, v in START.items()}
    checks = UpdateChecks(declared={0: 10, 1: 30})
    server = Server(START, FedAvg(), n_clients=3, per_round=3, min_clients=2, seed=0, checks=checks)
    assert server.aggregate_secure(0, SecureRound(members(10, 30), mean, {2: "gone"})) == [2]
    assert all(torch.equal(server.global_state[k], mean[k]) for k in START)
    momentum = Server(
        START, FedAvgM(["w", "b"], 1.0, 0.9), n_clients=3, per_round=3, min_clients=1, seed=0
    )
    momentum.aggregate_secure(0, SecureRound(members(10, 30), mean, {}))
    assert torch.allclose(momentum.global_state["w"], mean["w"])  # first step: lr 1, no history


def test_what_the_server_can_still_check_fails_the_round():
    mean = {k: v + 0.5 if v.is_floating_point() else v for k, v in START.items()}
    checks = UpdateChecks(declared={0: 10, 1: 30}, max_norm=0.1)
    server = Server(START, FedAvg(), n_clients=3, per_round=3, min_clients=1, seed=0, checks=checks)
    with pytest.raises(UserError, match="exceeds federated.max_update_norm"):
        server.aggregate_secure(0, SecureRound(members(10, 30), mean, {}))
    with pytest.raises(UserError, match="declared 30 when the run started"):
        server.aggregate_secure(0, SecureRound(members(10, 31), mean, {}))
    broken = mean | {"w": torch.full((6, 5), float("inf"))}
    with pytest.raises(UserError, match="non-finite"):
        server.aggregate_secure(0, SecureRound(members(10, 30), broken, {}))
    strict = Server(START, FedAvg(), n_clients=3, per_round=3, min_clients=3, seed=0)
    with pytest.raises(UserError, match="2 valid update"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strict.aggregate_secure(0, SecureRound(members(10, 30), mean, {2: "gone"}))


# -- the node side ----------------------------------------------------------------------------


class Cfg:
    def __init__(self, secure_aggregation: bool) -> None:
        self.federated = type("F", (), {"secure_aggregation": secure_aggregation})()


def test_a_node_refuses_a_plain_train_message_when_secure_aggregation_is_asked():
    node.check_secure(Cfg(False), {}, secure=False)
    node.check_secure(Cfg(True), {}, secure=True)
    with pytest.raises(UserError, match="federated.secure_aggregation is true"):
        node.check_secure(Cfg(True), {}, secure=False)
    with pytest.raises(UserError, match="node-config secure-aggregation"):
        node.check_secure(Cfg(False), {"secure-aggregation": True}, secure=False)


def test_delta_round_trip_and_epsilon_in_clear_text():
    state = trained(101)
    back = wire.add_delta(START, wire.flat_delta(state, START))
    assert all(torch.allclose(back[k], state[k], atol=1e-6) for k in ["w", "b"])
    assert torch.equal(back["steps"], START["steps"])
    update = ClientUpdate(0, state, 10, 0.5, 0.75, epsilon=2.5)
    assert wire.read_train_reply(wire.train_reply(update), 0)[0].epsilon == 2.5
    plain_update = ClientUpdate(0, state, 10, 0.5, 0.75)
    assert wire.read_train_reply(wire.train_reply(plain_update), 0)[0].epsilon is None
    content = wire.secure_train_reply(update, START)
    assert wire.read_metadata(content, 0, {}).epsilon == 2.5
    (delta,) = [a.numpy() for a in content["fitres.parameters"].values()]
    assert delta.dtype == np.float64 and delta.size == 6 * 5 + 7
