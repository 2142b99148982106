"""The server's view of the SuperNodes: `FlowerCohort` answers the round loop's calls
(`pneumonia.federated.cohort.Cohort`) with messages over Flower's Grid, so a deployment runs
the very loop, strategies and checks of the simulated run.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from pneumonia.core.errors import UserError, first_line
from pneumonia.data.imageset import ImageSet
from pneumonia.federated.aggregate import ClientUpdate
from pneumonia.federated.cohort import RoundTask, combined_digest
from pneumonia.federated.server import SecureRound
from pneumonia.flower import secure, wire
from pneumonia.training.recipe import Moments, Recipe


def wait_for_nodes(grid: Grid, expected: int, wait_s: float) -> list[int]:
    """The ids of `expected` connected SuperNodes, waiting up to `wait_s` seconds."""
    deadline = time.time() + wait_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) == expected:
            return nodes
        if len(nodes) > expected:
            raise UserError(
                f"{len(nodes)} SuperNodes are connected but federated.clients is {expected}: "
                f"set federated.clients to the number of hospitals"
            )
        if time.time() > deadline:
            raise UserError(
                f"only {len(nodes)} of {expected} SuperNodes connected within {wait_s:.0f} s: "
                f"start the others (flower-supernode ...) or lower federated.clients"
            )
        time.sleep(0.5)


POLL_S = 0.5  # Grid.send_and_receive polls every 3 s; a round's replies come in sooner


def exchange(
    grid: Grid, messages: list[Message], timeout: float, received: dict[str, float]
) -> list[Message | None]:
    """Each message's reply (None: none within `timeout` s), in the order of `messages`; the
    time each arrived goes into `received` by the id of the message it answers (an error
    reply Flower makes for a vanished node lacks the node's id)."""
    ids = list(grid.push_messages(messages))
    replies: dict[str, Message] = {}
    pending = {i for i in ids if i is not None}
    deadline = time.time() + timeout
    while pending and time.time() < deadline:
        for reply in grid.pull_messages(list(pending)):
            received[reply.metadata.reply_to_message_id] = time.time()
            replies[reply.metadata.reply_to_message_id] = reply
            pending.discard(reply.metadata.reply_to_message_id)
        if pending:
            time.sleep(POLL_S)
    return [replies.get(i) if i is not None else None for i in ids]


def reason(reply: Message) -> str:
    return f"its node replied with an error: {first_line(str(reply.error.reason), 300)}"


class FlowerCohort:
    """One client per SuperNode, in the order of the nodes' keys (partition id or name).
    With `record_timings`, each round's send, receive and node instants are kept in
    `timings` (bench/flower.py); otherwise nothing is timed."""

    def __init__(
        self,
        grid: Grid,
        config_yaml: str,
        expected: int,
        wait_s: float,
        round_timeout: float,
        record_timings: bool = False,
    ) -> None:
        self.grid, self.config_yaml, self.round_timeout = grid, config_yaml, round_timeout
        self.record_timings = record_timings
        self.recipe: Recipe | None = None
        self.timings: list[dict[int, dict[str, float]]] = []  # per round: client -> instants
        infos = self._query(wait_for_nodes(grid, expected, wait_s))
        keys = [info.key for _, info in infos]
        if len(set(keys)) != len(keys):
            raise UserError(
                f"two SuperNodes share a partition-id or name ({sorted(keys)}): give each "
                f"hospital its own --node-config"
            )
        infos.sort(key=lambda pair: pair[1].key)
        self.nodes = [node_id for node_id, _ in infos]
        self.infos = [info for _, info in infos]
        self.table = [{"client": j} | info.counts for j, info in enumerate(self.infos)]
        self.site_table = self.table  # a node is a site: none held out or pooled here
        self.held_out: ImageSet | None = None

    def _query(self, nodes: list[int]):
        messages = [
            Message(wire.query_request(self.config_yaml), dst_node_id=n, message_type="query")
            for n in nodes
        ]
        replies = exchange(self.grid, messages, self.round_timeout, {})
        problems = [
            f"node {n}: " + (reason(r) if r is not None else "no reply")
            for n, r in zip(nodes, replies, strict=True)
            if r is None or r.has_error()
        ]
        if problems:
            raise UserError("SuperNodes could not describe their data: " + "; ".join(problems))
        answered = zip(nodes, replies, strict=True)
        return [(n, wire.read_query_reply(r.content)) for n, r in answered if r is not None]

    def __len__(self) -> int:
        return len(self.nodes)

    def moments(self) -> list[Moments]:
        return [info.moments for info in self.infos]

    def fingerprint(self) -> str:
        return combined_digest([info.digest for info in self.infos])

    def start(self, recipe: Recipe, log_dir: Path) -> None:
        """The recipe travels with every round's request; each node builds its own module,
        Trainer and strategy half from it and logs on its own machine (node-config log-dir),
        so `log_dir`, the server's, is not theirs."""
        self.recipe = recipe

    def train_round(
        self, chosen: Sequence[int], task: RoundTask
    ) -> tuple[list[ClientUpdate], dict[int, str]]:
        """Send the round to the chosen nodes; a node that errs or stays silent is a failure."""
        messages = [
            Message(
                content, dst_node_id=node, message_type="train", group_id=str(task.round_index + 1)
            )
            for node, content in self.requests(chosen, task).items()
        ]
        sent = time.time()
        received: dict[str, float] = {}
        replies = exchange(self.grid, messages, self.round_timeout, received)
        updates, failures, timings = [], {}, {}
        # In client order, as the simulated run averages (float sums depend on the order).
        for j, reply in sorted(zip(chosen, replies, strict=True), key=lambda p: p[0]):
            if reply is None:
                failures[j] = f"no reply within {self.round_timeout:.0f} s"
            elif reply.has_error():
                failures[j] = self.failure(reply)
            else:
                update, node_times = self.read_reply(reply.content, j)
                if self.record_timings:
                    answered = reply.metadata.reply_to_message_id
                    timings[j] = node_times | {"sent": sent, "received": received[answered]}
                updates.append(update)
        if self.record_timings:
            self.timings.append(timings)
        return updates, failures

    def failure(self, reply: Message) -> str:
        """Why client `reply` answers for left the round."""
        return reason(reply)

    def read_reply(self, content: RecordDict, client: int) -> tuple[ClientUpdate, dict]:
        """A train reply's update and node timings."""
        return wire.read_train_reply(content, client)

    def requests(self, chosen: Sequence[int], task: RoundTask) -> dict[int, RecordDict]:
        """Node -> its train request for this round."""
        return {self.nodes[j]: wire.train_request(self.request(j, task)) for j in chosen}

    def request(self, client: int, task: RoundTask) -> wire.TrainRequest:
        assert self.recipe is not None  # the round loop calls start() before any round
        return wire.TrainRequest(task, client, self.config_yaml, self.recipe, self.record_timings)

    def secure_train_round(
        self, chosen: Sequence[int], task: RoundTask, clipping_range: float | None = None
    ) -> SecureRound:
        """A round under Flower's SecAgg+ (pneumonia.flower.secure): the members' clear-text
        metadata and the weighted average of their states; never one client's state.
        `clipping_range` bounds each coordinate of a change (federated.max_update_norm bounds
        the whole norm, hence each coordinate; without it, secure.DEFAULT_CLIPPING_RANGE)."""
        if len(chosen) < 3:
            raise UserError(
                f"federated.secure_aggregation needs at least 3 clients per round, and "
                f"{len(chosen)} are sampled: raise federated.fraction"
            )
        client_of = {self.nodes[j]: j for j in chosen}
        outcome = secure.secure_round(
            lambda messages, timeout: exchange(self.grid, messages, timeout, {}),
            self.requests(chosen, task),
            {self.nodes[j]: self.table[j]["images"] for j in chosen},
            task.round_index + 1,
            clipping_range or secure.DEFAULT_CLIPPING_RANGE,
            self.round_timeout,
        )
        updates = sorted(
            (replace(u, client=client_of[n]) for n, u in outcome.members.items()),
            key=lambda u: u.client,
        )
        failures = {client_of[n]: why for n, why in outcome.failures.items()}
        if outcome.mean_delta is None:
            halted = f"secure aggregation halted: {outcome.halted}"
            return SecureRound(updates, None, failures, halted)
        return SecureRound(updates, wire.add_delta(task.global_state, outcome.mean_delta), failures)

    def state_dict(self) -> list:
        return []  # each client's own state stays on its node

    def load_state_dict(self, states: list) -> None:
        pass
