"""One simulated hospital: its own images, DataModule, LightningModule and Lightning Trainer.

The Trainer is created once and kept across rounds; each round raises its max_epochs by E, so
its step counter, and with it every TensorBoard curve of the client, keeps increasing. What
leaves the client is a `ClientUpdate`: a state dict, a count and two summary numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from pneumonia.core.seeding import seed_training
from pneumonia.data.datamodule import ChestXrayDataModule
from pneumonia.data.imageset import ImageSet
from pneumonia.data.progressive import ProgressiveConfig
from pneumonia.data.transforms import AugmentConfig
from pneumonia.federated.aggregate import ClientUpdate, State
from pneumonia.training.privacy import PrivacyConfig, make_private, planned_steps
from pneumonia.training.recipe import Recipe, build_module, loss_weights


class OffsetTensorBoardLogger(TensorBoardLogger):
    """A TensorBoard logger whose steps start at `step_offset`: a Trainer rebuilt on resume
    continues the client's curves instead of drawing over them from step 0."""

    step_offset = 0

    def log_metrics(self, metrics, step=None):
        super().log_metrics(metrics, None if step is None else step + self.step_offset)


class RestoreOptimizer(Callback):
    """Loads the client's optimizer state of the previous round (keep_optimizer_state)."""

    def __init__(self, state: dict) -> None:
        self.state = state

    def on_train_start(self, trainer, pl_module) -> None:
        optimizer = trainer.optimizers[0]
        # The state carries last round's learning rates; this round's (round_lr) must win.
        rates = [group["lr"] for group in optimizer.param_groups]
        optimizer.load_state_dict(self.state)
        for group, lr in zip(optimizer.param_groups, rates, strict=True):
            group["lr"] = lr


def _callbacks(trainer: L.Trainer) -> list[Callback]:
    """The Trainer's list of callbacks, read afresh: a fit may replace the list (it orders it)."""
    # Lightning's callback connector sets the attribute; the Trainer class does not declare it.
    return trainer.callbacks  # type: ignore[attr-defined]


@dataclass
class ClientSettings:
    """What every client shares: loader and training settings, and where it logs."""

    batch_size: int
    balance: str  # data.balance: loss_weights, sampler or none
    augment: AugmentConfig | None
    num_workers: int
    seed: int
    trainer_args: dict
    keep_optimizer_state: bool = False
    privacy: PrivacyConfig | None = None  # DP-SGD on every client (privacy.*)
    planned_epochs: int = 1  # rounds x local epochs: what a target epsilon is spread over
    progressive: ProgressiveConfig | None = None  # data.progressive, over planned_epochs


class Client:
    """A hospital's half of federated training: its images, its module (built from the run's
    recipe, with its own class weights) and its Trainer, which logs to log_dir/client_<index>.
    It trains; it never sends images or labels."""

    def __init__(
        self, index: int, data: ImageSet, settings: ClientSettings, recipe: Recipe, log_dir: Path
    ) -> None:
        self.index, self.data, self.settings = index, data, settings
        self.module = build_module(recipe, loss_weights(settings.balance, data))
        self.datamodule = ChestXrayDataModule(
            data,
            None,
            batch_size=settings.batch_size,
            balanced_sampling=settings.balance == "sampler",
            augment=settings.augment,
            seed=settings.seed,
            num_workers=settings.num_workers,
            poisson=settings.privacy.batches() if settings.privacy is not None else None,
            progressive=settings.progressive,
            planned_epochs=settings.planned_epochs,
            front=self.module.fixed_features,
        )
        # Its own accountant for the whole run: epsilon grows with every round it trains.
        self.privacy = (
            make_private(
                self.module,
                settings.privacy,
                images=len(data),
                batch_size=settings.batch_size,
                planned_steps=planned_steps(
                    len(data), settings.batch_size, settings.planned_epochs
                ),
            )
            if settings.privacy is not None
            else None
        )
        self.logger = OffsetTensorBoardLogger(
            log_dir, name="", version=f"client_{index}", default_hp_metric=False
        )
        self.trainer = L.Trainer(
            **settings.trainer_args,
            max_epochs=0,
            logger=self.logger,
            callbacks=[],
            enable_checkpointing=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            default_root_dir=log_dir / f"client_{index}",
        )
        self.local_state: State = {}  # keys the strategy keeps on the client (FedBN: norms)
        self.optimizer_state: dict | None = None
        self.steps_before = 0  # optimizer steps of Trainers before this one (resume)

    def train_round(
        self,
        global_state: State,
        round_index: int,
        local_epochs: int,
        local_keys: frozenset[str] = frozenset(),
        callbacks: list[Callback] | None = None,
        lr: float | None = None,
    ) -> ClientUpdate:
        """Load the global weights (keeping `local_keys` of its own), train E epochs at
        learning rate `lr` (default optim.lr), return the update."""
        start = dict(global_state) | {k: v for k, v in self.local_state.items() if k in local_keys}
        self.module.load_state_dict(start)
        self.module.learning_rate = self.module.optim_cfg.lr if lr is None else lr
        seed_training(self.datamodule.generator, self.settings.seed, round_index, self.index)
        callbacks = list(callbacks or [])
        if self.settings.keep_optimizer_state and self.optimizer_state is not None:
            callbacks.append(RestoreOptimizer(self.optimizer_state))
        trainer = self.trainer
        _callbacks(trainer).extend(callbacks)
        trainer.fit_loop.max_epochs = trainer.current_epoch + local_epochs
        # The run's epoch, not this Trainer's: a client sampled in fewer rounds, or rebuilt on
        # resume, still follows the run's resolution schedule (data.progressive).
        self.datamodule.epoch_offset = round_index * local_epochs - trainer.current_epoch
        try:
            trainer.fit(self.module, self.datamodule)
        finally:
            for callback in callbacks:
                _callbacks(trainer).remove(callback)
        if self.settings.keep_optimizer_state:
            self.optimizer_state = trainer.optimizers[0].state_dict()
        state = {k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()}
        self.local_state = {k: state[k] for k in local_keys}
        metrics = trainer.callback_metrics
        return ClientUpdate(
            client=self.index,
            state=state,
            n=len(self.data),
            train_loss=float(metrics.get("train/loss_epoch", float("nan"))),
            train_accuracy=float(metrics.get("train/accuracy", float("nan"))),
            epsilon=self.privacy.epsilon() if self.privacy is not None else None,
        )

    def state_dict(self) -> dict:
        """What the client must keep between rounds to resume exactly."""
        return {
            "local_state": self.local_state,
            "optimizer_state": self.optimizer_state,
            "steps": self.steps_before + self.trainer.global_step,
            "privacy": self.privacy.state_dict() if self.privacy is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.local_state = state["local_state"]
        self.optimizer_state = state["optimizer_state"]
        self.steps_before = int(state["steps"])
        if self.privacy is not None:  # the epsilon spent before the interruption still counts
            self.privacy.load_state_dict(state["privacy"])
        self.logger.step_offset = self.steps_before - self.trainer.global_step
