"""Every training option of the ResNet review, through the real module: each trains a tiny
model end to end, `fit --help` lists every family's choices, unknown names are refused in
one line, and the default recipe trains to the same numbers as before the options existed."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pneumonia import fit
from pneumonia.core.errors import UserError
from pneumonia.models.layers import ACTIVATIONS, BatchRenorm2d, DropConnectLinear
from pneumonia.run.config import build_fit_parser, parse_fit_config
from pneumonia.training.losses import LOSS_NAMES
from pneumonia.training.module import SCHEDULERS
from pneumonia.training.optimizers import OPTIMIZER_NAMES
from pneumonia.training.recipe import Recipe, build_module

TINY = {"name": "se_resnet18", "norm": "gn", "width": 16, "gn_groups": 8}
IMAGES = torch.randint(
    0, 256, (8, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
)
LABELS = torch.tensor([0, 1, 1, 0, 1, 1, 0, 1])

OPTIONS = (
    [("model", {"activation": name}) for name in ACTIVATIONS]
    + [("loss", {"name": name}) for name in LOSS_NAMES]
    + [("optim", {"name": name}) for name in OPTIMIZER_NAMES]
    + [("optim", {"scheduler": name, "interval": "step"}) for name in SCHEDULERS]
    + [
        ("optim", {"scheduler": "cosine", "decay": {"warmup": 1}}),
        ("model", {"norm": "bn"}),
        ("model", {"norm": "brn", "brn_warmup": 2}),
        ("optim", {"l1": 1e-4}),
        ("model", {"drop_rate": 0.3, "block_drop_rate": 0.1}),
        ("model", {"drop_connect": 0.3}),
    ]
)


def recipe_with(group: str, values: dict) -> Recipe:
    parts = {"model": dict(TINY), "optim": {"lr": 0.01}, "loss": {}}
    parts[group] = parts[group] | values
    return Recipe(**parts, image_size=32)


@pytest.mark.parametrize("group,values", OPTIONS, ids=lambda v: str(v))
def test_every_option_trains_a_tiny_model_end_to_end(group, values, tmp_path):
    torch.manual_seed(0)
    module = build_module(recipe_with(group, values), class_weights=[1.5, 0.75])
    before = {k: v.clone() for k, v in module.state_dict().items()}
    loader = DataLoader(TensorDataset(IMAGES, LABELS), batch_size=4)
    trainer = L.Trainer(
        max_epochs=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, loader, loader)
    assert torch.isfinite(trainer.callback_metrics["train/loss_epoch"])
    after = module.state_dict()
    assert after.keys() == before.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    module.eval()
    with torch.no_grad():
        probs = module(IMAGES).softmax(1)[:, 1]
    assert ((probs >= 0) & (probs <= 1)).all()  # P(pneumonia), whatever the objective


def test_the_options_build_the_layers_they_name():
    def modules(group, values):
        return build_module(recipe_with(group, values)).model.modules()

    assert any(isinstance(m, torch.nn.PReLU) for m in modules("model", {"activation": "prelu"}))
    renorms = sum(isinstance(m, BatchRenorm2d) for m in modules("model", {"norm": "brn"}))
    norms = sum(type(m) is torch.nn.BatchNorm2d for m in modules("model", {"norm": "bn"}))
    # The stem's, 2 in each of 8 blocks, 4 shortcuts (at width 16 the first stage narrows
    # the stem's 64 channels too).
    assert renorms == norms == 21
    assert any(isinstance(m, DropConnectLinear) for m in modules("model", {"drop_connect": 0.2}))
    # SE gates keep their own ReLU and sigmoid whatever model.activation is.
    tanh = build_module(recipe_with("model", {"activation": "tanh"})).model
    assert isinstance(tanh.layer1[0].se.act, torch.nn.ReLU)
    assert isinstance(tanh.layer1[0].act1, torch.nn.Tanh)


def test_the_default_recipe_trains_to_the_numbers_it_had_before_the_options():
    """Three AdamW steps of the tiny default module, pinned from the code before this
    change (same seed): the options must not move the default by a bit."""
    torch.manual_seed(0)
    module = build_module(
        Recipe(model=TINY, optim={"scheduler": "none"}, image_size=32), class_weights=[1.5, 0.75]
    )
    optimizer = module.configure_optimizers()
    module.train()
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = module.training_loss(module(IMAGES_PINNED), LABELS)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    total = sum(
        v.double().sum().item() for v in module.state_dict().values() if v.is_floating_point()
    )
    assert losses == pytest.approx(PINNED_LOSSES, rel=1e-5)
    assert total == pytest.approx(PINNED_SUM, rel=1e-7)
    assert len(module.state_dict()) == 97  # no new keys (the objective holds none)


def test_l1_adds_the_sum_of_absolute_weights_by_hand():
    module = build_module(recipe_with("optim", {"l1": 0.5}))
    module.forward = lambda images: torch.zeros(len(images), 2)
    module.log = lambda *a, **k: None
    weights = [p for p in module.model.parameters() if p.ndim > 1]
    expected = torch.log(torch.tensor(2.0)) + 0.5 * sum(p.abs().sum() for p in weights)
    loss = module.training_loss(torch.zeros(8, 2), LABELS)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_a_step_schedule_spans_the_fit_calls_optimizer_steps():
    module = build_module(recipe_with("optim", {"scheduler": "polynomial", "interval": "step"}))
    module._trainer = SimpleNamespace(estimated_stepping_batches=10, max_epochs=2, current_epoch=0)
    config = module.configure_optimizers()
    sched = config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    lrs = []
    for _ in range(5):
        lrs.append(sched.get_last_lr()[0])
        config["optimizer"].step()
        sched.step()
    # TF's polynomial_decay, power 1, end 0, over 10 steps: lr x (1 - t/10).
    assert lrs == pytest.approx([0.01 * (1 - t / 10) for t in range(5)])


def test_fit_help_lists_every_familys_choices():
    text = build_fit_parser().format_help()
    for name in (*ACTIVATIONS, *LOSS_NAMES, *OPTIMIZER_NAMES, *SCHEDULERS, "brn"):
        assert name in text, name
    for key in ("--early_stopping.patience", "--optim.l1", "--model.drop_connect"):
        assert key in text


@pytest.mark.parametrize(
    "argv,line",
    [
        (["--model.activation", "swish"], "model.activation 'swish' is not one of: relu,"),
        (["--loss.name", "arcface"], "loss.name 'arcface' is not one of: cross_entropy,"),
        (["--optim.name", "lbfgs"], "optim.name 'lbfgs' is not one of: sgd, momentum,"),
        (["--optim.scheduler", "cyclic"], "optim.scheduler 'cyclic' is not one of: none,"),
        (["--model.norm", "ln"], "model.norm 'ln' is not one of: bn, gn, brn"),
    ],
)
def test_an_unknown_name_is_one_line_listing_the_choices(argv, line):
    with pytest.raises(UserError) as err:
        parse_fit_config(argv)
    message = str(err.value)
    assert message.startswith(line) and "\n" not in message


def test_an_unknown_name_exits_2_with_one_line_on_the_command_line(capsys):
    """fit's `main` (tests/test_errors.py runs the real process once)."""
    with pytest.raises(SystemExit) as stopped:
        fit.main(["--loss.name", "arcface"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0
    assert "loss.name 'arcface' is not one of:" in err and "focal" in err


@pytest.mark.parametrize(
    "argv,words",
    [
        (["--model.name", "alexnet", "--model.activation", "elu"], "model.activation applies"),
        (["--model.name", "vgg16", "--model.norm", "brn"], "model.norm brn applies"),
    ],
)
def test_resnet_family_options_are_refused_elsewhere(argv, words):
    from pneumonia.models.factory import create_model

    cfg, _, _ = parse_fit_config(argv)
    with pytest.raises(UserError, match=words):
        create_model(cfg.model)


# Measured with the code before the options (commit 3628550), torch 2.14.1 on CPU.
IMAGES_PINNED = IMAGES
PINNED_LOSSES = [0.793658435344696, 0.6439924836158752, 0.5669651627540588]
PINNED_SUM = 794.9821067147263


@pytest.mark.parametrize("loss", ["cosface", "l2_softmax", "center"])
def test_a_checkpoint_of_another_loss_predicts_and_exports_the_same_probabilities(loss, tmp_path):
    """Prediction and ONNX take the softmax of the logits the loss's head gives."""
    from pneumonia.inference.onnx_model import OnnxPredictor, export_onnx
    from pneumonia.inference.predictor import Predictor
    from pneumonia.training.checkpoint import write_checkpoint

    torch.manual_seed(0)
    recipe = recipe_with("loss", {"name": loss})
    module = build_module(recipe)
    ckpt = tmp_path / "best.ckpt"
    write_checkpoint(ckpt, module.state_dict(), recipe, round_number=1)
    module.eval()
    with torch.no_grad():
        expected = module(IMAGES).softmax(1)[:, 1]
    predicted = Predictor.from_checkpoint(ckpt).probabilities(IMAGES)
    assert torch.allclose(predicted, expected, atol=1e-6)
    export_onnx(ckpt, tmp_path / "model.onnx")
    exported = OnnxPredictor(tmp_path / "model.onnx").probabilities(IMAGES)
    assert torch.allclose(exported, expected, atol=1e-4)


def test_denormal_floats_are_flushed_by_a_command_start_not_by_an_import():
    """RMSProp's and AdaGrad's shrinking states slowed CPU steps 3x through denormals: a
    command's start-up flushes them; importing the optimizers leaves a library user's
    setting alone. A fresh process: the flag is per thread and this one's start-up set it."""
    denormal = "print((torch.tensor([1e-39]) * 1.0).item())"
    code = (
        "import torch, pneumonia.training.optimizers; "
        f"{denormal}; "
        "from pneumonia.core.startup import startup; startup(); "
        f"{denormal}"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    after_import, after_startup = done.stdout.split()
    assert float(after_import) != 0.0, done.stderr
    assert after_startup == "0.0", done.stderr
