"""The ClientApp every SuperNode runs: answers the server's query, and trains one round with
the package's own Client (LightningModule, Lightning Trainer, strategy callbacks).

The SuperNode starts a fresh process per message, so the client's own state between rounds
(FedBN's norm layers, a kept optimizer state, its step count) lives in Flower's
`context.state`, which stays on the node.
"""

from __future__ import annotations

import os
import time


def process_started() -> float:
    """When this process started (Linux /proc), or NaN: the node's share of bench/flower.py."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
            up = float(uptime.read().split()[0])
        return time.time() - up + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


PROCESS_LOADED = time.time()  # before torch and Lightning are imported: for bench/flower.py

from flwr.app import ConfigRecord, Context, Message  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from pneumonia.federated.cohort import run_client_round  # noqa: E402
from pneumonia.federated.strategies import create_strategy  # noqa: E402
from pneumonia.flower import node, wire  # noqa: E402

IMPORTED = time.time()

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    cfg = node.parse_run_config(wire.read_query_request(msg.content))
    info = node.describe(cfg, dict(context.node_config))
    return Message(wire.query_reply(info), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    started = time.time()
    task, index, config_yaml, hparams = wire.read_train_request(msg.content)
    cfg = node.parse_run_config(config_yaml)
    client = node.build_client(cfg, dict(context.node_config), index, hparams)
    if node.STATE_RECORD in context.state:
        client.load_state_dict(node.unpack_state(context.state[node.STATE_RECORD]["client"]))
    strategy = create_strategy(cfg.federated, client.module)
    ready = time.time()
    update = run_client_round(client, strategy, task)
    trained = time.time()
    context.state[node.STATE_RECORD] = ConfigRecord(
        {"client": node.pack_state(client.state_dict())}
    )
    # Wall-clock instants (seconds since the epoch): the server lines them up with its own
    # send and receive times to say where a round's time goes (bench/flower.py).
    timings = {
        "process": process_started(),
        "loaded": PROCESS_LOADED,  # Python, Flower, the message pulled
        "imported": IMPORTED,  # torch, Lightning, pneumonia
        "handler": started,
        "ready": ready,  # config, images, module and Trainer built
        "trained": trained,
    }
    return Message(wire.train_reply(update, timings), reply_to=msg)
