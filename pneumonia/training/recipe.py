"""The recipe: the run's config plus statistics of its training images, turned into the
hyper-parameters a `ClassifierModule` is built from.

Centralized runs, simulated clients, Flower nodes, evaluation and prediction all build their
module from a `Recipe` (the last two read it back from a checkpoint:
`pneumonia.training.checkpoint`).
A new hyper-parameter is one field here, or one field of the config dataclass it belongs to
(`OptimConfig`, `ModelConfig`), which travels inside `optim` or `model` untouched.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from pneumonia.core.bounds import ImageSide, allowed, first_out_of_range, out_of_range
from pneumonia.data.datamodule import class_balanced_weights
from pneumonia.data.imageset import CLASSES, ImageSet
from pneumonia.models.factory import ModelConfig
from pneumonia.training.losses import LossConfig
from pneumonia.training.module import ClassifierModule, OptimConfig

Moments = tuple[int, float, float]  # images, mean pixel, mean squared pixel (in [0, 1])


@dataclass(frozen=True)
class Recipe:
    """What a module is built from; saved in every checkpoint as its `hyper_parameters`.
    Plain values only: checkpoints must load with torch.load(weights_only=True)."""

    model: dict  # ModelConfig as a dict
    optim: dict  # OptimConfig as a dict
    image_size: int
    classes: tuple[str, ...] = CLASSES
    positive_class: str = "PNEUMONIA"
    mean: float = 0.5  # pixel normalisation, agreed on the training images
    std: float = 0.25
    threshold: float = 0.5  # decision threshold on P(positive)
    loss: dict | None = None  # LossConfig as a dict; None (older checkpoints): cross-entropy
    roi: str = "full"  # data.roi: the whole radiograph, or its lung field's box (lungs)
    intensity: str = "none"  # data.intensity: how each input's grey levels are standardised

    def hparams(self) -> dict:
        """The keyword arguments of `ClassifierModule`, as plain dicts and lists."""
        return asdict(self) | {"classes": list(self.classes)}

    @classmethod
    def from_hparams(cls, hparams: dict) -> Recipe:
        """The recipe a checkpoint's hyper-parameters describe (extra keys, such as the class
        weights older checkpoints carried, are training details and are dropped)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in hparams.items() if k in known}
        return cls(**values | {"classes": tuple(values.get("classes", CLASSES))})

    def with_threshold(self, threshold: float) -> Recipe:
        return replace(self, threshold=float(threshold))

    def out_of_range(self) -> tuple[str, object, str] | None:
        """(key, value, allowed range) of its first value outside the fit config's ranges
        (`pneumonia.core.bounds`), an ensemble's members included; None when all are in range. A
        recipe read from a file is checked before a module is built from it: its sizes (model
        width, image size) decide what the builder allocates."""
        if out_of_range(self.image_size, ImageSide):
            return "image_size", self.image_size, allowed(ImageSide)
        return (
            first_out_of_range(OptimConfig, self.optim, "optim")
            or first_out_of_range(LossConfig, self.loss or {}, "loss")
            or _model_out_of_range(self.model, "model")
        )


def _model_out_of_range(model: object, key: str) -> tuple[str, object, str] | None:
    """`Recipe.out_of_range` of a model config as a dict, its ensemble's members too."""
    if not isinstance(model, dict):
        return None  # ModelConfig refuses it
    bad = first_out_of_range(ModelConfig, model, key)
    spec = model.get("ensemble") if model.get("name") == "ensemble" else None
    members = spec.get("members") if isinstance(spec, dict) else None
    for k, member in enumerate(members if isinstance(members, list) else []):
        bad = bad or _member_out_of_range(member, f"{key}.ensemble.members[{k}]")
    return bad


def _member_out_of_range(member: object, key: str) -> tuple[str, object, str] | None:
    """An ensemble member's sizes (`pneumonia.models.ensemble_model`); its builder refuses the
    rest of what may be wrong with it."""
    if not isinstance(member, dict):
        return None
    model, classes = member.get("model"), member.get("classes")
    if isinstance(model, dict) and model.get("name") == "ensemble":
        return f"{key}.model.name", "ensemble", "a model that is not an ensemble itself"
    if out_of_range(member.get("image_size"), ImageSide):
        return f"{key}.image_size", member.get("image_size"), allowed(ImageSide)
    if not isinstance(classes, list | tuple):
        return f"{key}.classes", type(classes).__name__, "a list of 2 or 3 classes"
    if len(classes) not in (2, 3):
        return f"{key}.classes", f"{len(classes)} classes", "2 or 3 classes"
    return _model_out_of_range(model, f"{key}.model")


def normalisation(moments: list[Moments]) -> tuple[float, float]:
    """Pixel mean and std of the union of several image sets, from each one's moments: how a
    federation agrees on one normalisation without pooling images (one set: a central run)."""
    total = sum(n for n, _, _ in moments)
    mean = sum(n * m for n, m, _ in moments) / total
    mean_sq = sum(n * s for n, _, s in moments) / total
    return round(mean, 4), round(max(mean_sq - mean * mean, 0.0) ** 0.5, 4)


def make_recipe(cfg, classes: tuple[str, ...], moments: list[Moments]) -> Recipe:
    """The recipe of a fit config (`pneumonia.run.config`) for training images whose pixel moments
    are `moments` (one entry per client, or one for all)."""
    mean, std = normalisation(moments)
    return Recipe(
        model=asdict(cfg.model),
        optim=asdict(cfg.optim),
        loss=asdict(cfg.loss),
        image_size=cfg.data.image_size,
        classes=tuple(classes),
        positive_class=cfg.positive_class,
        mean=mean,
        std=std,
        roi=cfg.data.roi,
        intensity=cfg.data.intensity,
    )


def loss_weights(balance: str, images: ImageSet) -> list[float] | None:
    """Class weights of the training loss for `data.balance` (loss_weights: N / (K n_c) on the
    images this trainer sees), or None."""
    if balance != "loss_weights":
        return None
    return class_balanced_weights(images.labels, len(images.classes))


def build_module(recipe: Recipe, class_weights: list[float] | None = None) -> ClassifierModule:
    """The LightningModule of `recipe`, training with `class_weights` if given."""
    return ClassifierModule(**recipe.hparams(), class_weights=class_weights)
