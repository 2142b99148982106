"""A SuperNode's side: which images it holds, the `Client` that trains on them, and the client
state it keeps between rounds. Nothing here talks to the network (that is `client_app`).

Node config (`flower-supernode --node-config "..."`):
    data-root=DIR         the hospital's own images (class folders, or train/ with them);
                          without it, the run's data.root (or the synthetic images)
    partition-id=J        demo mode: split the data as the simulated run does, keep part J
    num-partitions=N      optional check that N equals the run's federated.clients
    name=NAME             orders hospitals into client indices (default: partition id)
    log-dir=DIR           the client's TensorBoard events (default: flower-node-logs)
    secure-aggregation=true
                          send updates only under secure aggregation (Flower's SecAgg+),
                          whatever the run's config says
"""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import torch
from flwr.app import ConfigRecord, RecordDict
from jsonargparse import Namespace

from pneumonia.core.errors import UserError
from pneumonia.data.imageset import ImageSet
from pneumonia.data.partition import partition, partition_table
from pneumonia.data.sources import load_images, load_splits
from pneumonia.federated.client import Client
from pneumonia.federated.cohort import client_settings, names_digest
from pneumonia.flower import wire
from pneumonia.flower.wire import NodeInfo
from pneumonia.run.config import parse_fit_config, trainer_arguments
from pneumonia.training.recipe import Recipe

STATE_RECORD = "pneumonia"  # context.state key; it never leaves the node


def parse_run_config(config_yaml: str) -> Namespace:
    """The server's resolved config, parsed as `fit` parses its own."""
    return parse_fit_config(["--config", config_yaml])[0]


def node_images(cfg: Namespace, node_config: dict) -> tuple[ImageSet, str]:
    """This node's training images and its sort key."""
    data = cfg.data
    if "data-root" in node_config:
        data = replace(data, root=str(node_config["data-root"]))
    if "partition-id" not in node_config:
        if "data-root" not in node_config:
            raise UserError("the SuperNode's --node-config needs data-root=DIR or partition-id=J")
        name = str(node_config.get("name", node_config["data-root"]))
        return load_images(data, cfg.seed)["train"], name
    j = int(node_config["partition-id"])
    fed = cfg.federated
    expected = int(node_config.get("num-partitions", fed.clients))
    if expected != fed.clients or not 0 <= j < fed.clients:
        raise UserError(
            f"node-config partition-id={j} num-partitions={expected} does not fit the run's "
            f"federated.clients {fed.clients}"
        )
    train = load_splits(data, cfg.seed, sites=fed.partition == "sites").train
    parts = partition(train, fed.partition, fed.clients, fed.alpha, cfg.seed)
    return train.subset(parts[j]), str(node_config.get("name", f"{j:06d}"))


def describe(cfg: Namespace, node_config: dict) -> NodeInfo:
    """The query's answer: counts, moments and a digest; no image leaves."""
    images, key = node_images(cfg, node_config)
    row = partition_table(images, [torch.arange(len(images))])[0]
    del row["client"]
    return NodeInfo(key, images.pixel_moments(), names_digest(images.names), row)


def check_secure(cfg: Namespace, node_config: dict, secure: bool) -> None:
    """Refuse to send a plain update when the run (or this hospital) asked for secure
    aggregation but the message came without SecAgg+: a server bug or a changed server must
    not turn a masked update into a clear one."""
    required = bool(node_config.get("secure-aggregation", False))
    if (cfg.federated.secure_aggregation or required) and not secure:
        key = "node-config secure-aggregation" if required else "federated.secure_aggregation"
        raise UserError(
            f"{key} is true but this train message came without SecAgg+: the update is not "
            f"sent; run the server with federated.secure_aggregation true"
        )


def build_client(
    cfg: Namespace, node_config: dict, index: int, recipe: Recipe, log_dir: str = ""
) -> Client:
    """The node's Client with its module and Trainer, as the simulated run builds it; it logs
    into `log_dir` (the simulation engine's run directory), else the node's log-dir."""
    images, _ = node_images(cfg, node_config)
    settings = client_settings(cfg, trainer_arguments(cfg))
    folder = Path(log_dir or str(node_config.get("log-dir", "flower-node-logs")))
    return Client(index, images, settings, recipe, folder)


def kept_state(sent: bytes | None, node_state: RecordDict) -> bytes:
    """The client's state from its previous rounds (b"": none yet): the one the server sent
    (the simulation engine keeps it), else the one this node kept."""
    if sent is not None:
        return sent
    if STATE_RECORD not in node_state:
        return b""
    return wire.bytes_of(wire.record_of(node_state, STATE_RECORD, ConfigRecord), "client")


def pack_state(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def unpack_state(data: bytes) -> dict:
    return torch.load(io.BytesIO(data), weights_only=True)
