"""What crosses the network between the ServerApp and a ClientApp, and nothing else.

query  server -> node: the run's resolved config (YAML text)
       node -> server: its sort key, image count, pixel moments, per-class counts and a hash
                       of its image names (for resume), never an image or a label
train  server -> node: the global state dict, round, local epochs, learning rate, the node's
                       client index, the config and the agreed hyper-parameters
       node -> server: its trained state dict, image count, mean training loss and accuracy,
                       and where its time went (for bench/flower.py)
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from pneumonia.federated.aggregate import ClientUpdate, State
from pneumonia.federated.cohort import Moments, RoundTask


@dataclass(frozen=True)
class NodeInfo:
    """A node's answer to the query."""

    key: str  # orders the nodes into client indices: partition id, else the node's name
    moments: Moments
    digest: str
    counts: dict  # images, patients and images per class


def to_arrays(state: State) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()})


def from_arrays(record: ArrayRecord) -> State:
    # torch.from_numpy shares Flower's buffer; clone so the state owns its memory.
    return {k: v.clone() for k, v in record.to_torch_state_dict().items()}


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


def train_request(task: RoundTask, client: int, config_yaml: str, hparams: dict) -> RecordDict:
    return RecordDict(
        {
            "global": to_arrays(task.global_state),
            "task": ConfigRecord(
                {
                    "round": task.round_index,
                    "local-epochs": task.local_epochs,
                    "lr": task.lr,
                    "client": client,
                    "config": config_yaml,
                    "hparams": json.dumps(hparams),
                }
            ),
        }
    )


def read_train_request(content: RecordDict) -> tuple[RoundTask, int, str, dict]:
    """(task, client index, config YAML, hyper-parameters)."""
    t = content["task"]
    task = RoundTask(
        from_arrays(content["global"]), int(t["round"]), int(t["local-epochs"]), float(t["lr"])
    )
    return task, int(t["client"]), str(t["config"]), json.loads(t["hparams"])


def train_reply(update: ClientUpdate, timings: dict[str, float]) -> RecordDict:
    metrics = {
        "num-examples": update.n,
        "train-loss": update.train_loss,
        "train-accuracy": update.train_accuracy,
    } | {f"time-{k}": v for k, v in timings.items()}
    return RecordDict({"update": to_arrays(update.state), "metrics": MetricRecord(metrics)})


def read_train_reply(content: RecordDict, client: int) -> tuple[ClientUpdate, dict[str, float]]:
    """The update, and the node's timings in seconds."""
    m = content["metrics"]
    update = ClientUpdate(
        client=client,
        state=from_arrays(content["update"]),
        n=int(m["num-examples"]),
        train_loss=float(m["train-loss"]),
        train_accuracy=float(m["train-accuracy"]),
    )
    timings = {k[len("time-") :]: float(v) for k, v in m.items() if k.startswith("time-")}
    return update, timings
