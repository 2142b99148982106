"""The clients of a federated run as the server sees them: how many, what each holds (counts
and pixel moments, never images), `start` (the run's recipe reaches them) and `train_round`,
one round of local training on the sampled ones.

`LocalCohort` holds the simulated hospitals in this process and calls their `Client`s directly.
`pneumonia.flower.cohort.FlowerCohort` answers the same calls by messages to SuperNodes, so the
round loop (`pneumonia.run.federated`) is one implementation for both.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from jsonargparse import Namespace

from pneumonia.core.errors import UserError, first_line
from pneumonia.data.imageset import ImageSet
from pneumonia.data.partition import partition, partition_table, site_names
from pneumonia.data.sites import image_site, site_profiles
from pneumonia.data.sources import Splits, concat
from pneumonia.federated.aggregate import ClientUpdate, State
from pneumonia.federated.client import Client, ClientSettings
from pneumonia.federated.options import shifts_sites
from pneumonia.federated.strategies import Strategy, create_strategy
from pneumonia.training.recipe import Moments, Recipe

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


@dataclass(frozen=True)
class RoundTask:
    """What a sampled client is asked to do in a round."""

    global_state: State
    round_index: int  # 0-based
    local_epochs: int
    lr: float


class Cohort(Protocol):
    table: list[dict]  # one row per client: images, patients, images per class
    site_table: list[dict]  # the same per site (a held-out or pooled site is no client)
    held_out: ImageSet | None  # the training images of the held-out site (federated.hold_out)

    def __len__(self) -> int: ...
    def moments(self) -> list[Moments]: ...
    def fingerprint(self) -> str: ...
    def start(self, recipe: Recipe, log_dir: Path) -> None: ...
    def train_round(
        self, chosen: Sequence[int], task: RoundTask
    ) -> tuple[list[ClientUpdate], dict[int, str]]: ...
    def state_dict(self) -> list: ...
    def load_state_dict(self, states: list) -> None: ...


def client_settings(cfg: Namespace, trainer_args: dict) -> ClientSettings:
    """What every client of a run shares, from the run's config."""
    return ClientSettings(
        batch_size=cfg.data.batch_size,
        balance=cfg.data.balance,
        augment=cfg.data.augment,
        num_workers=cfg.data.num_workers,
        seed=cfg.seed,
        trainer_args=client_trainer_arguments(trainer_args),
        keep_optimizer_state=cfg.federated.keep_optimizer_state,
        privacy=cfg.privacy if cfg.privacy.enabled else None,
        planned_epochs=cfg.federated.rounds * cfg.federated.local_epochs,
        progressive=cfg.data.progressive,
    )


def client_trainer_arguments(trainer_args: dict) -> dict:
    """A client Trainer's arguments: the run's, less what the round loop sets itself. Neither
    a model summary nor a progress bar per client and round: the run prints one line per round
    (trainer.enable_progress_bar true brings the bars back)."""
    kept = {k: v for k, v in trainer_args.items() if k not in CLIENT_MANAGED}
    return kept | {
        "enable_model_summary": False,
        "enable_progress_bar": bool(trainer_args.get("enable_progress_bar")),
    }


def names_digest(names: Sequence[str]) -> str:
    """Which images a client holds, as a hash (a resumed run must see the same partition).
    A name that is not valid UTF-8 (its bytes kept as surrogates) hashes as its bytes."""
    text = "\n".join(names) + "\0"
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def combined_digest(digests: Sequence[str]) -> str:
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def _concat_all(sets: list[ImageSet]) -> ImageSet:
    out = sets[0]
    for more in sets[1:]:
        out = concat(out, more)
    return out


def _counts(data: ImageSet, classes) -> dict:
    """A partition-table row's counts: images, patients and images per class."""
    counts = data.class_counts()
    return {"images": len(data), "patients": len(set(data.patients))} | dict(
        zip(classes, counts, strict=True)
    )


def run_client_round(client: Client, strategy: Strategy, task: RoundTask) -> ClientUpdate:
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


def misbehave(update: ClientUpdate, global_state: State, hostile) -> ClientUpdate:
    """The update a simulated hostile client sends instead (federated.hostile): global +
    scale x its change, and the image count it claims."""
    if update.client != hostile.client:
        return update
    state = dict(update.state)
    for key, start in global_state.items():
        if start.is_floating_point():
            state[key] = (start + hostile.scale * (state[key] - start)).to(start.dtype)
    n = hostile.claimed_images if hostile.claimed_images is not None else update.n
    return replace(update, state=state, n=n)


class LocalCohort:
    """The simulated hospitals, one per partition of the training split, in this process.
    Partitioning happens here, so its errors surface before a run directory exists; each
    hospital's `Client` (module and Trainer) is built by `start`.

    Sites and clients: the partition makes the sites (`site_data`, `site_table`); with
    federated.site_shift each site's images are re-imaged under its profile; a held-out site
    (federated.hold_out) becomes no client; federated.pooled puts the other sites' images in
    one client. `client_sites[c]` lists the sites whose images client c holds."""

    def __init__(self, cfg: Namespace, splits: Splits, trainer_args: dict) -> None:
        fed = cfg.federated
        parts = partition(splits.train, fed.partition, fed.clients, fed.alpha, cfg.seed)
        # Hospital folders have names (partition sites); simulated sites only their index.
        names = site_names(splits.train) if fed.partition == "sites" else None
        self.site_table = partition_table(splits.train, parts, names)
        self.site_data: list[ImageSet] = [splits.train.subset(idx) for idx in parts]
        if shifts_sites(fed):
            # Re-imaged from the images before data.intensity's standardisation, then
            # standardised: it sees what the site's scanner produced.
            raw = splits.raw_train if splits.raw_train is not None else splits.train
            profiles = site_profiles(len(parts), fed.site_seed)
            self.site_data = [
                image_site(raw.subset(idx), j, profiles[j], fed.site_seed, cfg.data.intensity)
                for j, idx in enumerate(parts)
            ]
        if fed.hold_out is not None and len(parts) < 2:
            raise UserError("federated.hold_out needs at least 2 sites: one to hold out")
        if fed.hold_out is not None and fed.hold_out >= len(parts):
            raise UserError(
                f"federated.hold_out {fed.hold_out} is not one of the {len(parts)} sites "
                f"(0-{len(parts) - 1})"
            )
        kept = [j for j in range(len(parts)) if j != fed.hold_out]
        self.held_out = self.site_data[fed.hold_out] if fed.hold_out is not None else None
        if fed.pooled:
            self.client_sites = [kept]
            self.data = [_concat_all([self.site_data[j] for j in kept])]
        else:
            self.client_sites = [[j] for j in kept]
            self.data = [self.site_data[j] for j in kept]
        # Which sites a client holds, as a column only when that is not simply its index.
        reshaped = fed.hold_out is not None or fed.pooled
        self.table = [
            {"client": c}
            | ({"sites": ";".join(map(str, sites))} if reshaped else {})
            | ({"site_name": ";".join(names[j] for j in sites)} if names else {})
            | _counts(self.data[c], splits.train.classes)
            for c, sites in enumerate(self.client_sites)
        ]
        self.settings = client_settings(cfg, trainer_args)
        self.federated = fed
        self.clients: list[Client] = []
        self.strategy: Strategy | None = None

    def __len__(self) -> int:
        return len(self.data)

    def moments(self) -> list[Moments]:
        return [data.pixel_moments() for data in self.data]

    def fingerprint(self) -> str:
        # As FlowerCohort computes it from the nodes' digests: one format for both.
        return combined_digest([names_digest(data.names) for data in self.data])

    def start(self, recipe: Recipe, log_dir: Path) -> None:
        """Every client's module and Trainer, logging under log_dir/client_J; the strategy's
        client half, built from the config as each Flower node builds its own."""
        self.clients = [
            Client(j, data, self.settings, recipe, log_dir) for j, data in enumerate(self.data)
        ]
        self.strategy = create_strategy(self.federated, self.clients[0].module)

    def train_round(self, chosen: Sequence[int], task: RoundTask):
        """Each chosen client trains from the global state; a client that raises is noted."""
        updates, failures = [], {}
        for j in chosen:
            try:
                assert self.strategy is not None  # start() builds it with the clients
                update = run_client_round(self.clients[j], self.strategy, task)
                updates.append(misbehave(update, task.global_state, self.federated.hostile))
            except Exception as err:  # one hospital's failure must not end the federation
                failures[j] = f"raised {type(err).__name__}: {first_line(err)}"
        return updates, failures

    def state_dict(self) -> list:
        return [c.state_dict() for c in self.clients]

    def load_state_dict(self, states: list) -> None:
        for client, state in zip(self.clients, states, strict=True):
            self.check_log_folder(client, state)
            client.load_state_dict(state)

    def check_log_folder(self, client: Client, state: dict) -> None:
        """A resumed client that has trained finds its folder (its TensorBoard curves) as it
        left it: anything else would fail its every later round and leave the hospital out."""
        folder = Path(client.logger.log_dir)
        if int(state["steps"]) == 0 or folder.is_dir():
            return
        sites = self.client_sites[client.index]
        who = f"client {client.index}" + (
            f" (site {', '.join(map(str, sites))})" if sites != [client.index] else ""
        )
        problem = "is missing" if not folder.exists() else "is not a folder"
        raise UserError(
            f"{folder}, the folder of {who}, {problem}: put that client's folder back (or "
            f"replace it with an empty folder to continue without its earlier curves), then "
            f"run the command again"
        )
