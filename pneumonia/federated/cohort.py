"""The clients of a federated run as the server sees them: how many, what each holds (counts
and pixel moments, never images), and `train`, one round of local training on the sampled ones.

`LocalCohort` holds the simulated hospitals in this process and calls their `Client`s directly.
`pneumonia.flower.cohort.FlowerCohort` answers the same calls by messages to SuperNodes, so the
round loop (`loop.FederatedRun`) is one implementation for both.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from jsonargparse import Namespace

from pneumonia.data.partition import partition, partition_table
from pneumonia.data.sources import Splits
from pneumonia.federated.aggregate import ClientUpdate, State
from pneumonia.federated.client import Client, ClientSettings
from pneumonia.federated.strategies import FedAvg

# Options the loop sets on every client Trainer itself.
CLIENT_MANAGED = {
    "max_epochs",
    "min_epochs",
    "max_steps",
    "limit_val_batches",
    "num_sanity_val_steps",
    "val_check_interval",
    "check_val_every_n_epoch",
}

Moments = tuple[int, float, float]  # images, mean pixel, mean squared pixel


@dataclass(frozen=True)
class RoundTask:
    """What a sampled client is asked to do in a round."""

    global_state: State
    round_index: int  # 0-based
    local_epochs: int
    lr: float


class Cohort(Protocol):
    table: list[dict]  # one row per client: images, patients, images per class

    def __len__(self) -> int: ...
    def moments(self) -> list[Moments]: ...
    def fingerprint(self) -> str: ...
    def attach(self, hparams: dict, run_dir: Path, strategy: FedAvg) -> None: ...
    def train(
        self, chosen: Sequence[int], task: RoundTask
    ) -> tuple[list[ClientUpdate], dict[int, str]]: ...
    def state_dict(self) -> list: ...
    def load_state_dict(self, states: list) -> None: ...


def client_settings(cfg: Namespace, trainer_args: dict) -> ClientSettings:
    """What every client of a run shares, from the run's config."""
    return ClientSettings(
        batch_size=cfg.data.batch_size,
        balanced_sampling=cfg.data.balance == "sampler",
        loss_weights=cfg.data.balance == "loss_weights",
        augment=cfg.data.augment,
        num_workers=cfg.data.num_workers,
        seed=cfg.seed,
        # The model summary would repeat for every client and round; the loop prints the table.
        trainer_args={k: v for k, v in trainer_args.items() if k not in CLIENT_MANAGED}
        | {"enable_model_summary": False},
        keep_optimizer_state=cfg.federated.keep_optimizer_state,
    )


def build_clients(cfg: Namespace, splits: Splits, trainer_args: dict):
    """One Client per partition of the training split, and the partition table."""
    fed = cfg.federated
    parts = partition(splits.train, fed.partition, fed.clients, fed.alpha, cfg.seed)
    settings = client_settings(cfg, trainer_args)
    clients = [Client(j, splits.train.subset(idx), settings) for j, idx in enumerate(parts)]
    return clients, partition_table(splits.train, parts)


def names_digest(names: Sequence[str]) -> str:
    """Which images a client holds, as a hash (a resumed run must see the same partition)."""
    return hashlib.sha256(("\n".join(names) + "\0").encode()).hexdigest()


def combined_digest(digests: Sequence[str]) -> str:
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def run_client_round(client: Client, strategy: FedAvg, task: RoundTask) -> ClientUpdate:
    """One client's local training for a round, as the strategy shapes it. The same call runs
    in this process (LocalCohort) and on a SuperNode (pneumonia.flower.node)."""
    return client.train_round(
        task.global_state,
        task.round_index,
        task.local_epochs,
        strategy.local_keys,
        strategy.client_callbacks(task.global_state),
        task.lr,
    )


class LocalCohort:
    """The simulated hospitals, one `Client` per partition, in this process."""

    def __init__(self, cfg: Namespace, splits: Splits, trainer_args: dict) -> None:
        self.clients, self.table = build_clients(cfg, splits, trainer_args)
        self.strategy: FedAvg | None = None

    def __len__(self) -> int:
        return len(self.clients)

    def moments(self) -> list[Moments]:
        return [c.data.pixel_moments() for c in self.clients]

    def fingerprint(self) -> str:
        # As FlowerCohort computes it from the nodes' digests: one format for both.
        return combined_digest([names_digest(c.data.names) for c in self.clients])

    def attach(self, hparams: dict, run_dir: Path, strategy: FedAvg) -> None:
        """Give every client its module and Trainer, logging under run_dir/clients/."""
        self.strategy = strategy
        for client in self.clients:
            client.build(hparams, run_dir / "clients")

    def train(self, chosen: Sequence[int], task: RoundTask):
        """Each chosen client trains from the global state; a client that raises is noted."""
        updates, failures = [], {}
        for j in chosen:
            try:
                updates.append(run_client_round(self.clients[j], self.strategy, task))
            except Exception as err:  # one hospital's failure must not end the federation
                failures[j] = f"raised {type(err).__name__}: {str(err).splitlines()[0][:200]}"
        return updates, failures

    def state_dict(self) -> list:
        return [c.state_dict() for c in self.clients]

    def load_state_dict(self, states: list) -> None:
        for client, state in zip(self.clients, states, strict=True):
            client.load_state_dict(state)
