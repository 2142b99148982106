"""The ClientApp every SuperNode runs: answers the server's query, and trains one round with
the package's own Client (LightningModule, Lightning Trainer, strategy callbacks).

The SuperNode starts a fresh process per message, so the client's own state between rounds
(FedBN's norm layers, a kept optimizer state, its step count) lives in Flower's
`context.state`, which stays on the node.

With federated.secure_aggregation, train messages go through Flower's `secaggplus_mod`
(`secure_aggregation`, below): three of its four stages only exchange keys and shares, and
the third calls `train`, whose reply the mod masks before it leaves the node. The package's
own modules (torch, Lightning: seconds to import) are imported inside the handlers, so the
key-exchange stages' processes start in about a second.
"""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS


def secure_aggregation(msg: Message, context: Context, call_next) -> Message:
    """Only SecAgg+ traffic goes through `secaggplus_mod`: the query and a plain train message
    carry none of its records (the mod would fail on them with a KeyError)."""
    if msg.metadata.message_type == "train" and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp(mods=[secure_aggregation])


@app.query()
def query(msg: Message, context: Context) -> Message:
    from pneumonia.flower import node, wire

    cfg = node.parse_run_config(wire.read_query_request(msg.content))
    info = node.describe(cfg, dict(context.node_config))
    return Message(wire.query_reply(info), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    from pneumonia.core.startup import startup
    from pneumonia.federated.cohort import run_client_round
    from pneumonia.federated.strategies import create_strategy
    from pneumonia.flower import node, wire

    # A command's process settings (denormals flushed, quiet warnings): the SuperNode starts a
    # fresh process per message, and this one trains.
    startup()
    started = time.time()
    request = wire.read_train_request(msg.content)
    cfg = node.parse_run_config(request.config_yaml)
    secure = RECORD_KEY_CONFIGS in msg.content.config_records
    node.check_secure(cfg, dict(context.node_config), secure)
    node_config = dict(context.node_config)
    client = node.build_client(cfg, node_config, request.client, request.recipe, request.log_dir)
    kept = node.kept_state(request.client_state, context.state)
    if kept:
        client.load_state_dict(node.unpack_state(kept))
    strategy = create_strategy(cfg.federated, client.module)
    ready = time.time()
    update = run_client_round(client, strategy, request.task)
    trained = time.time()
    state = node.pack_state(client.state_dict())
    if request.client_state is None:  # a deployment: the state stays on this node
        context.state[node.STATE_RECORD] = ConfigRecord({"client": state})
    if secure:  # the delta, for secaggplus_mod to mask; the count and metrics in clear text
        return Message(wire.secure_train_reply(update, request.task.global_state), reply_to=msg)
    # Only when the run asked (bench/flower.py): wall-clock instants the server lines up with
    # its own send and receive times to say where a round's time goes.
    timings = {"handler": started, "ready": ready, "trained": trained} if request.timings else None
    back = state if request.client_state is not None else None  # the server keeps it
    return Message(wire.train_reply(update, timings, back), reply_to=msg)
