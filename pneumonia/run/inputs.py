"""What centralized and federated training both start from (`RunInputs`) and both return
(`Trained`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from jsonargparse import Namespace
from lightning.pytorch.loggers import TensorBoardLogger

from pneumonia.data.sources import Splits
from pneumonia.run.progress import Progress
from pneumonia.training.recipe import Recipe


@dataclass(frozen=True)
class RunInputs:
    """The parsed config, the recipe, the splits, the run directory (which exists and holds
    config.yaml), the progress hook, whether to continue the run saved there, and whether it
    runs over Flower."""

    cfg: Namespace
    recipe: Recipe
    splits: Splits
    run_dir: Path
    progress: Progress | None = None
    resume: bool = False
    deployed: bool = False  # over Flower: resumed through the run config, not fit --resume


@dataclass
class Trained:
    """What `train_centralized` and `train_federated` both return, for `finalize`."""

    unit: str  # "epoch" or "round": what best.ckpt's step counts
    checkpoint: Path  # the reported model
    selected_by: str  # how it was chosen, in words
    logger: TensorBoardLogger  # the run's own events file
    details: dict = field(default_factory=dict)  # summary keys of this kind of run
    hparams_metrics: dict = field(default_factory=dict)  # for TensorBoard's HPARAMS tab
