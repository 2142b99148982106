"""What centralized and federated training both start from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from jsonargparse import Namespace

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
