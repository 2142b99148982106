"""The ClientApp every SuperNode runs: answers the server's query, and trains one round with
the package's own Client (LightningModule, Lightning Trainer, strategy callbacks).

The SuperNode starts a fresh process per message, so the client's own state between rounds
(FedBN's norm layers, a kept optimizer state, its step count) lives in Flower's
`context.state`, which stays on the node.
"""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from pneumonia.federated.cohort import run_client_round
from pneumonia.federated.strategies import create_strategy
from pneumonia.flower import node, wire

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    cfg = node.parse_run_config(wire.read_query_request(msg.content))
    info = node.describe(cfg, dict(context.node_config))
    return Message(wire.query_reply(info), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    started = time.time()
    request = wire.read_train_request(msg.content)
    cfg = node.parse_run_config(request.config_yaml)
    client = node.build_client(cfg, dict(context.node_config), request.client, request.recipe)
    if node.STATE_RECORD in context.state:
        client.load_state_dict(node.unpack_state(context.state[node.STATE_RECORD]["client"]))
    strategy = create_strategy(cfg.federated, client.module)
    ready = time.time()
    update = run_client_round(client, strategy, request.task)
    trained = time.time()
    context.state[node.STATE_RECORD] = ConfigRecord(
        {"client": node.pack_state(client.state_dict())}
    )
    # Only when the run asked (bench/flower.py): wall-clock instants the server lines up with
    # its own send and receive times to say where a round's time goes.
    timings = {"handler": started, "ready": ready, "trained": trained} if request.timings else None
    return Message(wire.train_reply(update, timings), reply_to=msg)
