"""One validation loss: the val/loss Lightning logs per epoch in a centralized run is the loss a
federation's rounds and the final scoring report (`pneumonia.inference.scoring`), the binary
log loss of P(pneumonia), with two classes and with three."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import TINY_MODEL
from torch.utils.data import DataLoader, TensorDataset

from pneumonia.data.imageset import CLASSES, THREE_CLASSES
from pneumonia.inference.scoring import predict_probabilities, score
from pneumonia.metrics.classification import binary_log_loss
from pneumonia.training.module import ClassifierModule


def tiny_module(classes: tuple[str, ...]) -> ClassifierModule:
    torch.manual_seed(0)
    return ClassifierModule(model=TINY_MODEL, optim={}, image_size=32, classes=classes)


def images_and_labels(classes: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (13, 1, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.arange(13) % len(classes)
    return images, labels


def logged_val_loss(module: ClassifierModule, images, labels) -> float:
    """The epoch's val/loss of a Lightning validation in uneven batches (5, 5, 3)."""
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = DataLoader(TensorDataset(images, labels), batch_size=5)
    (logged,) = trainer.validate(module, dataloaders=loader, verbose=False)
    return logged["val/loss"]


@pytest.mark.parametrize("classes", [CLASSES, THREE_CLASSES], ids=["two", "three"])
def test_centralized_val_loss_is_what_scoring_reports(classes):
    module = tiny_module(classes)
    images, labels = images_and_labels(classes)
    central = logged_val_loss(module, images, labels)
    scored = score(module, predict_probabilities(module, images), labels)[0]["loss"]
    assert central == pytest.approx(scored, abs=1e-6)


def test_the_log_loss_of_two_classes_is_their_softmax_cross_entropy():
    # Up to float32 rounding of P, which a confident mistake (1 - P tiny) magnifies.
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.25], [-1.0, 1.5], [0.0, 0.0]])
    labels = torch.tensor([0, 1, 0, 1])
    probs = logits.softmax(dim=1)[:, 1]
    value = binary_log_loss(probs, labels.bool())
    assert value.dtype == torch.float64
    expected = float(torch.nn.functional.cross_entropy(logits, labels))
    assert float(value) == pytest.approx(expected, abs=1e-6)


def test_the_log_loss_clips_a_confident_mistake_and_is_nan_for_no_images():
    one_mistake = binary_log_loss(torch.tensor([0.0]), torch.tensor([True]))
    assert float(one_mistake) == pytest.approx(-torch.log(torch.tensor(1e-7, dtype=torch.float64)))
    assert torch.isnan(binary_log_loss(torch.empty(0), torch.empty(0, dtype=torch.bool)))
