"""What crosses the network between the ServerApp and a ClientApp, and nothing else.

query  server -> node: the run's resolved config (YAML text)
       node -> server: its sort key, image count, pixel moments, per-class counts and a hash
                       of its image names (for resume), never an image or a label
train  server -> node: the global state dict, round, local epochs, learning rate, the node's
                       client index, the config, the agreed recipe, and whether to time itself
       node -> server: its trained state dict, image count, mean training loss and accuracy,
                       and, when asked, when each of its steps ended (bench/flower.py asks)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from pneumonia.federated.aggregate import ClientUpdate, State
from pneumonia.federated.cohort import RoundTask
from pneumonia.recipe import Moments, Recipe


@dataclass(frozen=True)
class NodeInfo:
    """A node's answer to the query."""

    key: str  # orders the nodes into client indices: partition id, else the node's name
    moments: Moments
    digest: str
    counts: dict  # images, patients and images per class


@dataclass(frozen=True)
class TrainRequest:
    """A round's work for one node."""

    task: RoundTask
    client: int  # the node's client index
    config_yaml: str  # the run's resolved fit config
    recipe: Recipe  # agreed by the server (normalisation from every node's moments)
    timings: bool  # report when each step ended (bench/flower.py)


def to_arrays(state: State) -> tuple[ArrayRecord, str]:
    """A state dict as one flat array per dtype, plus the layout to rebuild it. Flower moves
    every Array as its own object, each with a request or two: one array per tensor made
    a round of SE-ResNet-18 cost seconds of messaging (bench/flower.py)."""
    layout, groups = [], {}
    for key, tensor in state.items():
        dtype = str(tensor.dtype).removeprefix("torch.")
        layout.append([key, dtype, list(tensor.shape)])
        groups.setdefault(dtype, []).append(tensor.detach().cpu().reshape(-1))
    record = ArrayRecord({dtype: torch.cat(parts) for dtype, parts in groups.items()})
    return record, json.dumps(layout)


def from_arrays(record: ArrayRecord, layout: str) -> State:
    flat = record.to_torch_state_dict()
    offsets = dict.fromkeys(flat, 0)
    state = {}
    for key, dtype, shape in json.loads(layout):
        n = math.prod(shape)
        start = offsets[dtype]
        # clone: the slice would share Flower's buffer
        state[key] = flat[dtype][start : start + n].reshape(shape).clone()
        offsets[dtype] = start + n
    return state


def query_request(config_yaml: str) -> RecordDict:
    return RecordDict({"run": ConfigRecord({"config": config_yaml})})


def read_query_request(content: RecordDict) -> str:
    return str(content["run"]["config"])


def query_reply(info: NodeInfo) -> RecordDict:
    n, mean, mean_sq = info.moments
    return RecordDict(
        {
            "node": ConfigRecord(
                {"key": info.key, "digest": info.digest, "counts": json.dumps(info.counts)}
            ),
            "moments": MetricRecord({"n": n, "mean": mean, "mean-sq": mean_sq}),
        }
    )


def read_query_reply(content: RecordDict) -> NodeInfo:
    node, m = content["node"], content["moments"]
    moments = (int(m["n"]), float(m["mean"]), float(m["mean-sq"]))
    return NodeInfo(str(node["key"]), moments, str(node["digest"]), json.loads(node["counts"]))


def train_request(request: TrainRequest) -> RecordDict:
    arrays, layout = to_arrays(request.task.global_state)
    task = request.task
    return RecordDict(
        {
            "global": arrays,
            "task": ConfigRecord(
                {
                    "layout": layout,
                    "round": task.round_index,
                    "local-epochs": task.local_epochs,
                    "lr": task.lr,
                    "client": request.client,
                    "config": request.config_yaml,
                    "hparams": json.dumps(request.recipe.hparams()),
                    "timings": request.timings,
                }
            ),
        }
    )


def read_train_request(content: RecordDict) -> TrainRequest:
    t = content["task"]
    state = from_arrays(content["global"], str(t["layout"]))
    task = RoundTask(state, int(t["round"]), int(t["local-epochs"]), float(t["lr"]))
    recipe = Recipe.from_hparams(json.loads(t["hparams"]))
    return TrainRequest(task, int(t["client"]), str(t["config"]), recipe, bool(t["timings"]))


def train_reply(update: ClientUpdate, timings: dict[str, float] | None = None) -> RecordDict:
    metrics = {
        "num-examples": update.n,
        "train-loss": update.train_loss,
        "train-accuracy": update.train_accuracy,
    } | {f"time-{k}": v for k, v in (timings or {}).items()}
    arrays, layout = to_arrays(update.state)
    return RecordDict(
        {
            "update": arrays,
            "layout": ConfigRecord({"layout": layout}),
            "metrics": MetricRecord(metrics),
        }
    )


def read_train_reply(content: RecordDict, client: int) -> tuple[ClientUpdate, dict[str, float]]:
    """The update, and the node's timings if it was asked for them (instants, seconds since
    the epoch; else empty)."""
    m = content["metrics"]
    update = ClientUpdate(
        client=client,
        state=from_arrays(content["update"], str(content["layout"]["layout"])),
        n=int(m["num-examples"]),
        train_loss=float(m["train-loss"]),
        train_accuracy=float(m["train-accuracy"]),
    )
    timings = {k[len("time-") :]: float(v) for k, v in m.items() if k.startswith("time-")}
    return update, timings
