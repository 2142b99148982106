"""What crosses the network between the ServerApp and a ClientApp, and nothing else.

query  server -> node: the run's resolved config (YAML text)
       node -> server: its sort key, image count, pixel moments, per-class counts and a hash
                       of its image names (for resume), never an image or a label
train  server -> node: the global state dict, round, local epochs, learning rate, the node's
                       client index, the config, the agreed recipe, and whether to time itself
       node -> server: its trained state dict, image count, mean training loss and accuracy,
                       its DP epsilon so far (with DP-SGD), and, when asked, when each of its
                       steps ended (bench/flower.py asks)
       and, on the simulation engine only (pneumonia.flower.simulation), the client's own state
       between rounds both ways (the server keeps it, as the in-process loop does, so that a
       resume is exact) and the folder it logs into; a deployment's nodes keep their own
secure train (federated.secure_aggregation, Flower's SecAgg+; pneumonia.flower.secure)
       server -> node: the same request, inside the protocol's third stage
       node -> server: `secure_train_reply`: its change to the float tensors (update - global) as
                       one flat float64 array in Flower's FitRes form, which `secaggplus_mod`
                       masks before it leaves the node, and in clear text the image count,
                       training loss and accuracy, and epsilon; integer buffers (BatchNorm's
                       num_batches_tracked) are not sent: the aggregate keeps the global's
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from pneumonia.federated.aggregate import ClientUpdate, State
from pneumonia.federated.cohort import RoundTask
from pneumonia.training.recipe import Moments, Recipe

AnyRecord = TypeVar("AnyRecord", ArrayRecord, ConfigRecord, MetricRecord)
CLIENT_STATE = "client-state"  # the record of a client's own state (the simulation engine)


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
    # The simulation engine's: None, the node keeps the client's state itself (a deployment);
    # bytes, the server keeps it and the node returns the new one (b"": not trained yet).
    client_state: bytes | None = None
    log_dir: str = ""  # where the client logs ("": the node's log-dir)


def to_arrays(state: State) -> tuple[ArrayRecord, str]:
    """A state dict as one flat array per dtype, plus the layout to rebuild it. Flower moves
    every Array as its own object, each with a request or two: one array per tensor made
    a round of SE-ResNet-18 cost seconds of messaging (bench/flower.py)."""
    layout: list[list] = []
    groups: dict[str, list[torch.Tensor]] = {}
    for key, tensor in state.items():
        dtype = str(tensor.dtype).removeprefix("torch.")
        layout.append([key, dtype, list(tensor.shape)])
        groups.setdefault(dtype, []).append(tensor.detach().cpu().reshape(-1))
    flat: dict[str, torch.Tensor] = {dtype: torch.cat(parts) for dtype, parts in groups.items()}
    return ArrayRecord(flat), json.dumps(layout)


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


# -- reading what the other side wrote: each value has the type its writer above gives it
# (Flower types a record's values as any of its kinds); another type is a TypeError.


def record_of(content: RecordDict, key: str, kind: type[AnyRecord]) -> AnyRecord:
    """content[key], a record of `kind`."""
    record = content[key]
    if not isinstance(record, kind):
        raise TypeError(f"record {key!r} is a {type(record).__name__}, not a {kind.__name__}")
    return record


def number_of(record: ConfigRecord | MetricRecord, key: str) -> int | float:
    """record[key], an int or a float."""
    value = record[key]
    if not isinstance(value, int | float):
        raise TypeError(f"{key!r} holds a {type(value).__name__}, not a number")
    return value


def text_of(record: ConfigRecord, key: str) -> str:
    """record[key], a str."""
    value = record[key]
    if not isinstance(value, str):
        raise TypeError(f"{key!r} holds a {type(value).__name__}, not text")
    return value


def bytes_of(record: ConfigRecord, key: str) -> bytes:
    """record[key], bytes."""
    value = record[key]
    if not isinstance(value, bytes):
        raise TypeError(f"{key!r} holds a {type(value).__name__}, not bytes")
    return value


# -- messages


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
    node, m = record_of(content, "node", ConfigRecord), record_of(content, "moments", MetricRecord)
    moments = (int(number_of(m, "n")), float(number_of(m, "mean")), float(number_of(m, "mean-sq")))
    counts = json.loads(text_of(node, "counts"))
    return NodeInfo(str(node["key"]), moments, str(node["digest"]), counts)


def train_request(request: TrainRequest) -> RecordDict:
    arrays, layout = to_arrays(request.task.global_state)
    task = request.task
    content = RecordDict(
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
                    "log-dir": request.log_dir,
                }
            ),
        }
    )
    if request.client_state is not None:
        content[CLIENT_STATE] = ConfigRecord({"state": request.client_state})
    return content


def read_train_request(content: RecordDict) -> TrainRequest:
    t = record_of(content, "task", ConfigRecord)
    state = from_arrays(record_of(content, "global", ArrayRecord), str(t["layout"]))
    epochs, lr = int(number_of(t, "local-epochs")), float(number_of(t, "lr"))
    task = RoundTask(state, int(number_of(t, "round")), epochs, lr)
    recipe = Recipe.from_hparams(json.loads(text_of(t, "hparams")))
    client = int(number_of(t, "client"))
    log_dir = text_of(t, "log-dir") if "log-dir" in t else ""
    kept = read_client_state(content)
    return TrainRequest(task, client, str(t["config"]), recipe, bool(t["timings"]), kept, log_dir)


def train_reply(
    update: ClientUpdate,
    timings: dict[str, float] | None = None,
    client_state: bytes | None = None,
) -> RecordDict:
    """The trained update; `client_state`, the client's state after the round, where the
    server keeps it (the simulation engine)."""
    arrays, layout = to_arrays(update.state)
    content = RecordDict(
        {
            "update": arrays,
            "layout": ConfigRecord({"layout": layout}),
            "metrics": MetricRecord(clear_metrics(update) | time_metrics(timings)),
        }
    )
    if client_state is not None:
        content[CLIENT_STATE] = ConfigRecord({"state": client_state})
    return content


def read_client_state(content: RecordDict) -> bytes | None:
    """The client state a train request or reply carries (the simulation engine's), or None."""
    if CLIENT_STATE not in content:
        return None
    return bytes_of(record_of(content, CLIENT_STATE, ConfigRecord), "state")


def clear_metrics(update: ClientUpdate) -> dict:
    """What travels in clear text in either reply: the count, two summary numbers, epsilon."""
    metrics = {
        "num-examples": update.n,
        "train-loss": update.train_loss,
        "train-accuracy": update.train_accuracy,
    }
    return metrics | ({"epsilon": update.epsilon} if update.epsilon is not None else {})


def time_metrics(timings: dict[str, float] | None) -> dict:
    return {f"time-{k}": v for k, v in (timings or {}).items()}


def read_metadata(content: RecordDict, client: int, state: State) -> ClientUpdate:
    """A reply's clear-text metrics as a ClientUpdate holding `state`."""
    m = record_of(content, "metrics", MetricRecord)
    return ClientUpdate(
        client=client,
        state=state,
        n=int(number_of(m, "num-examples")),
        train_loss=float(number_of(m, "train-loss")),
        train_accuracy=float(number_of(m, "train-accuracy")),
        epsilon=float(number_of(m, "epsilon")) if "epsilon" in m else None,
    )


def read_train_reply(content: RecordDict, client: int) -> tuple[ClientUpdate, dict[str, float]]:
    """The update, and the node's timings if it was asked for them (instants, seconds since
    the epoch; else empty)."""
    layout = str(content["layout"]["layout"])
    state = from_arrays(record_of(content, "update", ArrayRecord), layout)
    update = read_metadata(content, client, state)
    m = record_of(content, "metrics", MetricRecord)
    timings = {k[len("time-") :]: float(number_of(m, k)) for k in m if k.startswith("time-")}
    return update, timings


# -- secure aggregation (SecAgg+) ------------------------------------------------------------


def float_keys(state: State) -> list[str]:
    """The tensors secure aggregation sums, in the state dict's order (both sides agree)."""
    return [key for key, tensor in state.items() if tensor.is_floating_point()]


def flat_delta(state: State, global_state: State) -> np.ndarray:
    """update - global of every float tensor, as one float64 vector: one array for SecAgg+ to
    mask (one per tensor would cost a protocol round trip's worth of objects each), and
    float64 so that its quantization to 2^22 levels is not blurred by float32 rounding."""
    parts = [
        (state[k].detach().cpu().double() - global_state[k].detach().cpu().double()).reshape(-1)
        for k in float_keys(global_state)
    ]
    return torch.cat(parts).numpy() if parts else np.zeros(0)


def add_delta(global_state: State, delta: np.ndarray) -> State:
    """global + delta for the float tensors (cast back to each one's dtype); integer buffers
    stay the global's (they were never sent)."""
    flat = torch.from_numpy(np.asarray(delta, dtype=np.float64))
    out, start = {}, 0
    for key, tensor in global_state.items():
        if tensor.is_floating_point():
            part = flat[start : start + tensor.numel()].reshape(tensor.shape)
            out[key] = (tensor.double() + part).to(tensor.dtype)
            start += tensor.numel()
        else:
            out[key] = tensor.clone()
    if start != flat.numel():
        raise ValueError(f"a delta of {flat.numel()} values for {start} float values")
    return out


def secure_train_reply(update: ClientUpdate, global_state: State) -> RecordDict:
    """The reply `secaggplus_mod` turns into a masked vector: Flower's FitRes records (the
    delta in `fitres.parameters`, the weight in `fitres.num_examples`), plus our clear-text
    `metrics`. The mod clears every ArrayRecord before the reply leaves the node. Each
    coordinate is clipped by the mod to +-clipping_range x max_weight / n before quantization
    (pneumonia.flower.secure); a non-finite delta would quantize to garbage, so it is refused
    here and the node drops out of the round."""
    delta = flat_delta(update.state, global_state)
    if not np.isfinite(delta).all():
        raise ValueError("the trained model holds non-finite values: not sent")
    return RecordDict(
        {
            "fitres.parameters": ArrayRecord({"delta": Array(delta)}),
            "fitres.num_examples": MetricRecord({"num_examples": update.n}),
            "fitres.metrics": ConfigRecord({}),
            "fitres.status": ConfigRecord({"code": 0, "message": ""}),
            "metrics": MetricRecord(clear_metrics(update)),
        }
    )
