"""Classification heads: finding a model's classifier, and putting another in its place.

Every builder returns a model whose last layer is a 2-output Linear (timm's `fc`, a torchvision
`classifier.6`, ...). `replace_classifier` swaps it for a Linear with another number of outputs
(three classes) or for the thesis's head: BatchNorm, Dropout, a 256-unit Linear with ReLU,
BatchNorm, Dropout and the output Linear, on the globally pooled features (Keras's
GlobalAveragePooling2D -> BatchNormalization -> Dropout -> Dense(256, relu) -> ... -> Dense).
With `model.norm gn` the two norms are GroupNorms, which neither federated averaging nor DP-SGD
has trouble with. Torchvision's AlexNet and VGG keep a 4096-unit MLP after a 7x7 pooling; the
thesis head replaces that MLP (their pooling becomes global), so it sees pooled conv features
in every model.
"""

from __future__ import annotations

import math

from torch import nn

from pneumonia.core.errors import UserError

HIDDEN = 256  # the thesis head's hidden units


def classifier_layer(model: nn.Module, num_classes: int = 2) -> tuple[nn.Module, str]:
    """(parent, attribute) of the model's classifier: its last layer with `num_classes`
    outputs, a Linear (timm's `fc`, torchvision's `classifier.6`, the thesis head's `out`) or a
    loss's head in its place (pneumonia.training.losses), whose input is the penultimate
    features."""
    found = None
    for name, layer in model.named_modules():
        if getattr(layer, "out_features", None) == num_classes:
            found = name
    if found is None:
        raise UserError(f"this model has no Linear classifier with {num_classes} outputs")
    parent_name, _, attr = found.rpartition(".")
    return model.get_submodule(parent_name), attr


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    if kind == "gn":
        return nn.GroupNorm(math.gcd(groups, channels), channels)
    return nn.BatchNorm1d(channels)


def thesis_head(
    in_features: int, num_classes: int, norm: str = "bn", dropout: float = 0.5, groups: int = 16
) -> nn.Sequential:
    """The thesis's head on pooled features [B, in_features] -> logits [B, num_classes]."""
    return nn.Sequential(
        _norm(norm, in_features, groups),
        nn.Dropout(dropout),
        nn.Linear(in_features, HIDDEN),
        nn.ReLU(inplace=False),  # Opacus and the shortcut checks want no in-place ops
        _norm(norm, HIDDEN, groups),
        nn.Dropout(dropout),
        nn.Linear(HIDDEN, num_classes),
    )


def replace_classifier(
    model: nn.Module,
    head: str,
    norm: str,
    dropout: float,
    num_classes: int,
    groups: int = 16,
) -> None:
    """Put `head` ("linear" or "thesis") with `num_classes` outputs in place of the model's
    2-class classifier, in place."""
    if head == "thesis" and _is_torchvision_mlp(model):
        features = model.get_submodule("features").modules()
        channels = [m.out_channels for m in features if isinstance(m, nn.Conv2d)]
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        model.classifier = thesis_head(channels[-1], num_classes, norm, dropout, groups)
        return
    parent, attr = classifier_layer(model)
    linear = getattr(parent, attr)
    if not isinstance(linear, nn.Linear):
        raise UserError(f"model.head {head}: this model's classifier is not a Linear layer")
    new: nn.Module
    if head == "thesis":
        new = thesis_head(linear.in_features, num_classes, norm, dropout, groups)
    else:
        new = nn.Linear(linear.in_features, num_classes)
    setattr(parent, attr, new)


def _is_torchvision_mlp(model: nn.Module) -> bool:
    """AlexNet and VGG as torchvision builds them: features, avgpool, classifier MLP."""
    return all(hasattr(model, a) for a in ("features", "avgpool", "classifier")) and isinstance(
        model.classifier, nn.Sequential
    )
