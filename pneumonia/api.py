"""The public API, re-exported by `pneumonia/__init__.py`: what a program or notebook calls.

The same work as the commands, without their process settings, printing or exits:
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
    """Train one classifier, as `python -m pneumonia.fit --config CONFIG --KEY VALUE ...` does.

    Args:
        config: A YAML config file; None trains with the embedded default
            (`configs/default.yaml`: synthetic images, 3 federated clients).
        overrides: Dotted keys to values, as on the command line, e.g.
            `{"data.root": "chest_xray/train", "federated.rounds": 2}`.
        run_dir: Where the run directory goes; None: `runs/<experiment>/version_<n>`.
        progress: A hook called with each progress line (None: log records only).

    Returns:
        The run's summary (the contents of its `summary.json`); `"run_dir"` names the run
        directory, which holds the checkpoints, metrics and TensorBoard events.

    Raises:
        UserError: A config key, value or data folder the user can fix (one line saying what
            to do).
    """
    argv = ["--config", str(config)] if config is not None else []
    for key, value in (overrides or {}).items():
        argv += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    if run_dir is not None:
        argv += ["--run_dir", str(run_dir)]
    return fit.run(argv, progress)


def load_checkpoint(
    path: str | Path, threshold: float | None = None, device: str = "cpu"
) -> Predictor:
    """Load a trained model, ready to predict.

    Args:
        path: A checkpoint file, or a run directory (its reported model, `best.ckpt`).
        threshold: The decision threshold on P(pneumonia); None: the one stored with the
            model (chosen on validation when it was trained).
        device: Where the model runs (`"cpu"`, `"cuda"`, ...).

    Returns:
        A `Predictor` for `predict_files` or its own methods.

    Raises:
        UserError: A missing file, or one that is not a checkpoint of this package.
    """
    path = Path(path)
    if path.is_dir() and best_checkpoint(path).is_file():
        path = best_checkpoint(path)
    return Predictor.from_checkpoint(path, threshold, device)


def predict_files(
    model: Predictor | str | Path, inputs: Iterable[str | Path], batch_size: int = 64
) -> tuple[list[dict], list[tuple[str, str]]]:
    """Predict P(pneumonia) and the decision for every image or DICOM file among `inputs`.

    Args:
        model: A model from `load_checkpoint`, or a checkpoint or run directory path.
        inputs: Image or DICOM files, or folders walked for them.
        batch_size: Images scored at once.

    Returns:
        `(rows, skipped)`: one dict per image as `python -m pneumonia.predict` writes its CSV
        rows, and `(input, why it was skipped)` for each input that could not be read.

    Raises:
        UserError: No image file among the inputs.
    """
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
    """Build a freshly initialised network by registry name, as `model.*` options would.

    Args:
        name: A name from `list_models()`.
        image_size: The side of the input images; checks the network can take images that
            small. A network shaped to the image size (`scatter_linear`) needs it.
        num_classes: The number of logits.
        **options: Other `ModelConfig` fields (`norm="gn"`, `width=16`, ...). Their names
            are checked; their values are not range-checked as `--model.*` values are.

    Returns:
        A torch module taking one-channel images `[B, 1, S, S]` to `[B, num_classes]` logits.

    Raises:
        UserError: An unknown model name or option.
    """
    unknown = sorted(set(options) - set(factory.ModelConfig.__dataclass_fields__))
    if unknown:
        raise UserError(f"unknown model option {unknown[0]!r}: see pneumonia.ModelConfig")
    # Names checked above; values go in as given (only the config parser checks ranges)
    cfg = factory.ModelConfig(name=name, **options)  # type: ignore[arg-type]
    return factory.create_model(cfg, image_size, num_classes)


def list_models() -> list[str]:
    """List the model names `create_model` and `model.name` accept.

    Returns:
        The registry's names, and the `timm/` prefix that takes any timm model.
    """
    return [*factory.MODELS.names(), f"{factory.TIMM_PREFIX}<any timm model>"]
