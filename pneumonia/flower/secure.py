"""One round of Flower's SecAgg+ (`SecAggPlusWorkflow`), driven from the package's round loop:
the server learns the image-count-weighted average of the round's updates, never one alone.

The workflow was written for Flower's legacy round loop; it needs a `LegacyContext` whose
legacy strategy hands out each node's instructions (`Collect.configure_fit`) and receives the
aggregate (`Collect.aggregate_fit`), and it calls nothing on the Grid but `send_and_receive`.
`ProtocolGrid` answers that call with the cohort's own exchange (fast polling, a node's
failure noted with its reason), puts the train request into the stage that trains, and drops
a trained reply whose clear-text image count is not the one its node declared (the workflow
then treats that node as dropped out and removes its masks from the sum).

The protocol (four stages, one message each way per node and stage):
    setup                    the node makes two key pairs, returns the public keys
    share_keys               the node splits its mask seed and one secret key into shares,
                             encrypted to each neighbour, forwarded by the server
    collect_masked_vectors   the node trains (`client_app.train`) and returns its delta,
                             quantized, weighted and masked, plus clear-text metadata
    unmask                   the nodes return the shares the server needs to remove the masks
                             of the nodes still there and of those that dropped out
Each stage starts a fresh `flwr-clientapp` process per node: a secure round costs about three
more message round trips than a plain one (bench/secagg.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import FitIns, Parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow

from pneumonia.core.errors import first_line
from pneumonia.federated.aggregate import ClientUpdate
from pneumonia.flower import wire

# Without federated.max_update_norm: Flower's default, which keeps any change of a weight up
# to 8 (far beyond a round's) and quantizes in steps of 2 x 8 / 2^22 = 3.8e-6.
DEFAULT_CLIPPING_RANGE = 8.0

Send = Callable[[list[Message], float], list[Message | None]]


def protocol_shares(clients: int) -> tuple[int, int]:
    """(num_shares, reconstruction_threshold) for a round of `clients` (3 or more).

    Every client shares its secrets with all the others (num_shares = clients: hospitals are
    few, so SecAgg+'s sparse neighbourhoods would only weaken the threshold), and a strict
    majority of them, clients // 2 + 1, rebuilds one: the most dropouts (clients - threshold:
    1 of 3, 2 of 5) that still keep a server from collecting both a client's mask seed and
    its secret key by calling it alive to some clients and dropped to the others."""
    return clients, clients // 2 + 1


@dataclass
class Outcome:
    """A secure round as the cohort reads it, by node id."""

    members: dict[int, ClientUpdate]  # clear-text metadata of the nodes inside the sum
    failures: dict[int, str]  # nodes that dropped out, and why
    mean_delta: np.ndarray | None  # the weighted average of the members' deltas
    halted: str = ""  # why there is no aggregate


class Collect(LegacyStrategy):
    """The workflow's hooks into a legacy strategy: hand out an (empty) FitIns per node (the
    train request is put in by `ProtocolGrid`) and keep what the workflow aggregates."""

    def __init__(self, nodes: list[int], grid: ProtocolGrid) -> None:
        self.nodes, self.grid = nodes, grid
        self.results: tuple[list, list] | None = None

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        empty = FitIns(Parameters([], ""), {})
        # The proxy only names the node: the workflow sends through the grid it was given.
        return [(GridClientProxy(node, self.grid, 0), empty) for node in self.nodes]

    def aggregate_fit(self, server_round, results, failures):
        self.results = (results, failures)
        return None, {}  # nothing for the workflow to keep

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


@dataclass
class ProtocolGrid:
    """What the workflow calls on the Grid, over the cohort's exchange."""

    send: Send
    requests: dict[int, RecordDict]  # node -> its train request (wire.train_request)
    declared: dict[int, int]  # node -> the image count it declared at the start
    timeout: float
    failures: dict[int, str] = field(default_factory=dict)
    metadata: dict[int, ClientUpdate] = field(default_factory=dict)

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        messages = list(messages)
        if not messages:
            return []
        stage = str(messages[0].content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])
        if stage == Stage.COLLECT_MASKED_VECTORS:
            messages = [self.with_request(m) for m in messages]
        kept = []
        for message, reply in zip(messages, self.send(messages, self.timeout), strict=True):
            node = message.metadata.dst_node_id
            problem = self.problem(stage, node, reply)
            if reply is not None and problem is None:
                kept.append(reply)
            else:
                self.failures.setdefault(node, f"{problem} (secure aggregation stage {stage})")
        return kept

    def with_request(self, message: Message) -> Message:
        """The training stage's message: the node's train request beside the protocol's
        records (the workflow would send a legacy FitIns)."""
        node = message.metadata.dst_node_id
        content = RecordDict(dict(self.requests[node]))
        content[RECORD_KEY_CONFIGS] = message.content.config_records[RECORD_KEY_CONFIGS]
        return Message(
            content,
            dst_node_id=node,
            message_type=message.metadata.message_type,
            group_id=message.metadata.group_id,
        )

    def problem(self, stage: str, node: int, reply: Message | None) -> str | None:
        """Why the workflow must treat `node` as dropped out (None: it may go on)."""
        if reply is None:
            return f"no reply within {self.timeout:.0f} s"
        if reply.has_error():
            return f"its node replied with an error: {first_line(str(reply.error.reason), 300)}"
        if RECORD_KEY_CONFIGS not in reply.content.config_records:
            return "its reply lacks the protocol's records"
        if stage != Stage.COLLECT_MASKED_VECTORS:
            return None
        try:
            update = wire.read_metadata(reply.content, -1, {})
        except (KeyError, TypeError, ValueError) as err:
            return f"its reply lacks the clear-text metrics ({first_line(err)})"
        weight = wire.record_of(reply.content, "fitres.num_examples", MetricRecord)
        masked_n = int(wire.number_of(weight, "num_examples"))
        if update.n != self.declared[node] or masked_n != update.n:
            return (
                f"it reports {update.n} training images (weight {masked_n}), but declared "
                f"{self.declared[node]} when the run started"
            )
        self.metadata[node] = update
        return None


def secure_round(
    send: Send,
    requests: dict[int, RecordDict],
    declared: dict[int, int],
    round_number: int,
    clipping_range: float,
    timeout: float,
) -> Outcome:
    """One SecAgg+ round over the nodes of `requests`; the weighted average of their deltas
    (each within +-clipping_range per coordinate, after weighting by n / max_weight) or why
    there is none. `max_weight` is the largest declared count: the weights stay in (0, 1],
    where quantization is finest."""
    nodes = sorted(requests)
    num_shares, threshold = protocol_shares(len(nodes))
    grid = ProtocolGrid(send, requests, declared, timeout)
    strategy = Collect(nodes, grid)
    context = LegacyContext(Context(0, 0, {}, RecordDict(), {}), strategy=strategy)
    context.state["config"] = ConfigRecord({"current_round": round_number})
    context.state["parameters"] = ArrayRecord()
    workflow = Workflow(
        num_shares,
        threshold,
        max_weight=float(max(declared[n] for n in nodes)),
        clipping_range=clipping_range,
        timeout=timeout,
    )
    try:
        # The workflow calls a Grid's send_and_receive alone: ProtocolGrid is that much of one.
        workflow(grid, context)  # type: ignore[arg-type]
    except Exception as err:  # a malformed share or key: the round fails, the run does not
        return Outcome({}, grid.failures, None, f"the protocol failed: {first_line(err)}")
    if strategy.results is None:
        left = len(nodes) - len(grid.failures)
        why = (
            f"{left} of {len(nodes)} clients stayed through the protocol, fewer than its "
            f"reconstruction threshold {threshold}"
        )
        return Outcome({}, grid.failures, None, why)
    results, _ = strategy.results
    members = {proxy.node_id: grid.metadata[proxy.node_id] for proxy, _ in results}
    (mean_delta,) = parameters_to_ndarrays(results[0][1].parameters)
    failures = {n: why for n, why in grid.failures.items() if n not in members}
    return Outcome(members, failures, mean_delta)


class Workflow(SecAggPlusWorkflow):
    """Flower's workflow with one repair: a node that drops out before it has shared its keys
    (setup or share_keys) has masked nothing and holds no one's shares, so it leaves the
    round's node set. Flower 1.41 keeps it there, then halts for want of its key shares:
    one hospital down at the start of a round would fail every later round."""

    def setup_stage(self, grid, context, state) -> bool:
        return super().setup_stage(grid, context, state) and self.forget_absent(state)

    def share_keys_stage(self, grid, context, state) -> bool:
        return super().share_keys_stage(grid, context, state) and self.forget_absent(state)

    def forget_absent(self, state) -> bool:
        active = set(state.active_node_ids)
        state.sampled_node_ids = active
        state.nid_to_neighbours = {
            node: neighbours & active
            for node, neighbours in state.nid_to_neighbours.items()
            if node in active
        }
        return self._check_threshold(state)
