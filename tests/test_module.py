"""The LightningModule's loss, optimizers and schedules, and the CUDA defaults of fit."""

from types import SimpleNamespace

import pytest
import torch

from pneumonia.data.datamodule import class_balanced_weights
from pneumonia.run import config
from pneumonia.training.module import ClassifierModule

MODEL = {"name": "resnet18", "norm": "gn"}


def make_module(**kwargs) -> ClassifierModule:
    return ClassifierModule(model=MODEL, image_size=32, **kwargs)


@pytest.mark.parametrize(
    "name,scheduler,optimizer_type,scheduler_type",
    [
        ("sgd", "step", torch.optim.SGD, torch.optim.lr_scheduler.StepLR),
        ("adam", "cosine", torch.optim.Adam, torch.optim.lr_scheduler.CosineAnnealingLR),
        ("adamw", "plateau", torch.optim.AdamW, torch.optim.lr_scheduler.ReduceLROnPlateau),
        ("sgd", "none", torch.optim.SGD, None),
    ],
)
def test_optimizer_and_schedule_from_config(name, scheduler, optimizer_type, scheduler_type):
    module = make_module(optim={"name": name, "lr": 0.05, "scheduler": scheduler})
    # A kept federated client Trainer: 4 epochs done, 3 to go in this round's fit call.
    module._trainer = SimpleNamespace(max_epochs=7, current_epoch=4)
    config = module.configure_optimizers()
    if isinstance(config, dict):
        optimizer, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
        if scheduler == "plateau":
            assert config["lr_scheduler"]["monitor"] == "val/loss"
        else:
            assert config["lr_scheduler"]["interval"] == "epoch"
    elif isinstance(config, tuple | list):
        (optimizer,), (sched,) = config
    else:
        optimizer, sched = config, None
    assert type(optimizer) is optimizer_type
    assert optimizer.param_groups[0]["lr"] == 0.05
    assert (sched is None) if scheduler_type is None else isinstance(sched, scheduler_type)
    if scheduler == "cosine":
        assert sched.T_max == 3  # the cosine spans this fit call's epochs only


def test_class_weighted_loss_matches_hand_computation():
    labels = torch.tensor([0, 1, 1, 1])
    weights = class_balanced_weights(labels, 2)
    assert weights == pytest.approx([2.0, 2 / 3])
    module = make_module(optim={}, class_weights=weights)
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]])
    nll = -torch.log_softmax(logits, 1)[torch.arange(4), labels]
    w = torch.tensor([2.0, 2 / 3, 2 / 3, 2 / 3])
    expected = (w * nll).sum() / w.sum()
    module.forward = lambda images: logits  # the loss alone, whatever the network
    module.log = lambda *a, **k: None
    loss = module._step((torch.zeros(4, 1, 32, 32, dtype=torch.uint8), labels), "train")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_positive_class_normal_flips_the_target():
    module = make_module(optim={}, positive_class="NORMAL")
    logits = torch.tensor([[3.0, 0.0]])
    assert module.positive == 0
    assert module.positive_probability(logits).item() == pytest.approx(
        torch.softmax(logits, 1)[0, 0].item()
    )


def test_normalisation_treats_uint8_and_unit_floats_alike():
    module = make_module(optim={}, mean=0.4, std=0.2).eval()
    images = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(module(images), module(images.float() / 255), atol=1e-5)


def test_cuda_defaults_to_mixed_precision_cpu_to_full(monkeypatch):
    cfg = SimpleNamespace(trainer={"accelerator": "auto", "precision": None})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert config.trainer_arguments(cfg)["precision"] == "32-true"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert config.trainer_arguments(cfg)["precision"] == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert config.trainer_arguments(cfg)["precision"] == "16-mixed"
    explicit = SimpleNamespace(trainer={"accelerator": "auto", "precision": "32-true"})
    assert config.trainer_arguments(explicit)["precision"] == "32-true"
