"""model.transfer: frozen layers stay as loaded, centrally and in every federated client."""

from dataclasses import asdict

import pytest
import torch

from pneumonia import fit
from pneumonia.core.errors import UserError
from pneumonia.models.factory import ModelConfig
from pneumonia.models.transfer import parse_transfer
from pneumonia.training.checkpoint import read_checkpoint, write_checkpoint
from pneumonia.training.module import OptimConfig
from pneumonia.training.recipe import Recipe, build_module

TINY_FED = [
    "--data.image_size", "32",
    "--data.synthetic.n_patients", "40",
    "--data.batch_size", "16",
    "--model.name", "resnet18",
    "--model.norm", "bn",
    "--model.width", "16",
    "--federated.enabled", "true",
    "--federated.rounds", "2",
    "--federated.local_epochs", "1",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]  # fmt: skip


@pytest.mark.parametrize("spec", ["freeze:5", "freeze", "head", "features:2"])
def test_a_bad_transfer_spec_is_one_line_naming_the_key(spec):
    with pytest.raises(UserError, match="model.transfer"):
        parse_transfer(spec)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A three-class BatchNorm ResNet-18 (width 16) checkpoint with trained BN statistics."""
    torch.manual_seed(0)
    cfg = ModelConfig(name="resnet18", norm="bn", width=16)
    recipe = Recipe(
        model=asdict(cfg), optim=asdict(OptimConfig()), image_size=32,
        classes=("NORMAL", "BACTERIA", "VIRUS"),
    )  # fmt: skip
    module = build_module(recipe).train()
    with torch.no_grad():
        module(torch.rand(8, 1, 32, 32))  # running statistics away from 0 and 1
    path = tmp_path_factory.mktemp("source") / "best.ckpt"
    write_checkpoint(path, module.state_dict(), recipe, 1)
    return path


def _target(source, transfer: str):
    cfg = ModelConfig(
        name="resnet18", norm="bn", width=16, pretrained=str(source), transfer=transfer
    )
    optim = asdict(OptimConfig(scheduler="none"))  # no scheduler: no Trainer needed
    return build_module(Recipe(model=asdict(cfg), optim=optim, image_size=32))


def _one_step(module):
    optimizer = module.configure_optimizers()
    module.train()
    images, labels = torch.rand(8, 1, 32, 32), torch.tensor([0, 1] * 4)
    loss = torch.nn.functional.cross_entropy(module(images), labels)
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize(
    ("transfer", "frozen", "trained"),
    [
        ("freeze:2", ("conv1.", "bn1.", "layer1.", "layer2."), ("layer3.", "layer4.", "fc.")),
        ("features", ("conv1.", "layer1.", "layer4."), ("fc.",)),
        ("finetune", (), ("conv1.", "layer1.", "fc.")),
    ],
)
def test_frozen_weights_and_statistics_survive_a_training_step(source, transfer, frozen, trained):
    module = _target(source, transfer)
    _, loaded, _ = read_checkpoint(source)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    for key in before:  # everything but the 3-class output layer came from the source
        if not key.startswith("fc."):
            assert torch.equal(before[key], loaded[f"model.{key}"]), key
    _one_step(module)
    after = module.model.state_dict()
    for key in before:
        if key.startswith(frozen):
            assert torch.equal(before[key], after[key]), f"{key} moved although frozen"
    for prefix in trained:
        moved = [k for k in before if k.startswith(prefix) and not torch.equal(before[k], after[k])]
        assert moved, f"nothing under {prefix} trained"
    optimizer = module.configure_optimizers()
    held = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert held == module.frozen.trainable_parameters


def test_a_federated_run_keeps_frozen_layers_in_every_client(source, tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["--model.pretrained", str(source), "--model.transfer", "freeze:3"]
    summary = fit.main([*TINY_FED, *argv, "--run_dir", str(run_dir)])
    assert summary["transfer"]["frozen"] == ["conv1", "bn1", "layer1", "layer2", "layer3"]
    counts = summary["transfer"]
    assert counts["trainable_parameters"] + counts["frozen_parameters"] == summary["parameters"]
    assert 0 < counts["frozen_parameters"] < summary["parameters"]
    assert "transfer freeze:3: froze conv1, bn1, layer1, layer2, layer3" in capsys.readouterr().out
    _, loaded, _ = read_checkpoint(source)
    _, final, _ = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    frozen = [k for k in final if k.startswith(("model.conv1", "model.bn1", "model.layer3"))]
    assert any("running_mean" in k for k in frozen)
    for key in frozen:  # two rounds of three clients: no client sent a change
        assert torch.equal(final[key], loaded[key]), key
    assert not torch.equal(
        final["model.layer4.1.conv2.weight"], loaded["model.layer4.1.conv2.weight"]
    )
