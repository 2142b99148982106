"""Chest X-ray classifiers (NORMAL vs PNEUMONIA) trained centrally or federated, on Lightning.

The public API is what `__all__` names; everything else is internal and may move. From the
command line the same work is `python -m pneumonia.fit`, `.evaluate`, `.predict`, `.export`,
`.ensemble`, `.serve` and `.compare`.

    import pneumonia
    pneumonia.console()  # print a run's progress lines, as the commands do
    summary = pneumonia.train("configs/default.yaml", {"federated.rounds": 2}, run_dir="runs/a")
    model = pneumonia.load_checkpoint(summary["run_dir"])
    rows, skipped = pneumonia.predict_files(model, ["xray.png"])
    net = pneumonia.create_model("se_resnet18", norm="gn")

The names load on first use, so `import pneumonia` stays cheap and sets nothing process-wide.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "ModelConfig",
    "Predictor",
    "UserError",
    "console",
    "create_model",
    "list_models",
    "load_checkpoint",
    "predict_files",
    "train",
]

# name -> the module that owns it
_OWNERS = {
    "ModelConfig": "pneumonia.models.factory",
    "Predictor": "pneumonia.inference.predictor",
    "UserError": "pneumonia.core.errors",
    "console": "pneumonia.core.startup",
    "create_model": "pneumonia.api",
    "list_models": "pneumonia.api",
    "load_checkpoint": "pneumonia.api",
    "predict_files": "pneumonia.api",
    "train": "pneumonia.api",
}

if TYPE_CHECKING:
    from pneumonia.api import create_model, list_models, load_checkpoint, predict_files, train
    from pneumonia.core.errors import UserError
    from pneumonia.core.startup import console
    from pneumonia.inference.predictor import Predictor
    from pneumonia.models.factory import ModelConfig


def __getattr__(name: str) -> Any:
    if name not in _OWNERS:
        raise AttributeError(f"module 'pneumonia' has no attribute {name!r}")
    value = getattr(importlib.import_module(_OWNERS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
