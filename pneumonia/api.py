"""The public API (re-exported by `pneumonia/__init__.py`): what a notebook or another program
calls. The same work as the commands, without their process settings, printing or exits:
errors a user can fix raise `UserError`, and a run's progress lines are log records that
`console()` prints.

    import pneumonia
    summary = pneumonia.train("configs/default.yaml", {"federated.rounds": 2}, run_dir="runs/a")
    model = pneumonia.load_checkpoint(summary["run_dir"])
    rows, skipped = pneumonia.predict_files(model, ["xray.png", "folder/of/images"])
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from torch import nn

from pneumonia import fit
from pneumonia.core.errors import UserError
from pneumonia.inference import predictor as _predictor
from pneumonia.inference.predictor import Predictor
from pneumonia.models import factory
from pneumonia.run.progress import Progress
from pneumonia.run.rundir import best_checkpoint


def train(
    config: str | Path | None = None,
    overrides: Mapping[str, object] | None = None,
    *,
    run_dir: str | Path | None = None,
    progress: Progress | None = None,
) -> dict:
    """Train one classifier as `python -m pneumonia.fit --config CONFIG --KEY VALUE ...` does
    and return its summary (summary.json's contents; "run_dir" names the run directory).
    `config`: a YAML file (None: the embedded default); `overrides`: dotted keys to values,
    e.g. {"data.root": "chest_xray/train", "federated.rounds": 2}."""
    argv = ["--config", str(config)] if config is not None else []
    for key, value in (overrides or {}).items():
        argv += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    if run_dir is not None:
        argv += ["--run_dir", str(run_dir)]
    return fit.run(argv, progress)


def load_checkpoint(
    path: str | Path, threshold: float | None = None, device: str = "cpu"
) -> Predictor:
    """The model of a checkpoint (or of a run directory: its reported model), ready to
    predict; deciding at its own threshold or at `threshold`."""
    path = Path(path)
    if path.is_dir() and best_checkpoint(path).is_file():
        path = best_checkpoint(path)
    return Predictor.from_checkpoint(path, threshold, device)


def predict_files(
    model: Predictor | str | Path, inputs: Iterable[str | Path], batch_size: int = 64
) -> tuple[list[dict], list[tuple[str, str]]]:
    """P(pneumonia) and the decision for every image or DICOM file among `inputs` (files, or
    folders walked for them), as `python -m pneumonia.predict` writes them: (rows, [(input,
    why it was skipped)]). `model`: a loaded model or a checkpoint / run directory path."""
    if not isinstance(model, Predictor):
        model = load_checkpoint(model)
    files, missing = _predictor.find_inputs(inputs)
    if not files:
        raise UserError("no image files among the inputs: give image files or folders of them")
    rows, unreadable = _predictor.predict_files(model, files, batch_size, progress=False)
    return rows, missing + unreadable


def create_model(
    name: str = "se_resnet18",
    *,
    image_size: int | None = None,
    num_classes: int = factory.NUM_CLASSES,
    **options: object,
) -> nn.Module:
    """A freshly initialised network by registry name (`list_models()`), built as `model.*`
    options would build it (`norm="gn"`, `width=16`, ...); one-channel input, `num_classes`
    logits. With `image_size`, checks the network can take images that small; a network
    shaped to the image size (scatter_linear) needs it. The options' names are checked, their
    values are not range-checked as `--model.*` values are."""
    unknown = sorted(set(options) - set(factory.ModelConfig.__dataclass_fields__))
    if unknown:
        raise UserError(f"unknown model option {unknown[0]!r}: see pneumonia.ModelConfig")
    # Names checked above; values go in as given (only the config parser checks ranges)
    cfg = factory.ModelConfig(name=name, **options)  # type: ignore[arg-type]
    return factory.create_model(cfg, image_size, num_classes)


def list_models() -> list[str]:
    """The names `create_model` and `model.name` accept."""
    return [*factory.MODELS.names(), f"{factory.TIMM_PREFIX}<any timm model>"]
