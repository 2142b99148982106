"""The DP-friendly models (scatter_linear, scatter_cnn, wsgn_cnn): shapes and sizes, their
refusals, per-image gradients under Opacus, and every path a model takes (centralized and
private federated training, prediction, Grad-CAM, ONNX, ensembles)."""

import logging
import shutil

import pytest
import torch
from conftest import run_predict, write_image
from torch import nn

import pneumonia
from pneumonia import ensemble, fit
from pneumonia.core.errors import UserError
from pneumonia.inference.explain import explainable, target_layer
from pneumonia.inference.onnx_model import OnnxPredictor, export_onnx
from pneumonia.inference.predictor import Predictor
from pneumonia.inference.scoring import predict_probabilities
from pneumonia.models.dp_nets import WSConv2d
from pneumonia.models.factory import ModelConfig, count_parameters, create_model
from pneumonia.training.privacy import (
    check_private_model,
    grad_sample_hooks,
    probe_per_image_gradients,
)
from pneumonia.training.recipe import Recipe, build_module

NAMES = ["scatter_linear", "scatter_cnn", "wsgn_cnn"]
SIZE = 32
# At SIZE: scatter_linear's Linear reads the whole 81 x 8 x 8 map, 2 classes.
PARAMETERS = {"scatter_linear": 81 * 8 * 8 * 2 + 2, "scatter_cnn": 158_274, "wsgn_cnn": 292_098}
TINY = [
    "--figures_every", "0",
    "--data.image_size", str(SIZE),
    "--data.synthetic.n_patients", "24",
    "--data.batch_size", "8",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
    "--trainer.log_every_n_steps", "1",
]  # fmt: skip
CENTRAL = ["--federated.enabled", "false", "--trainer.max_epochs", "1"]
PRIVATE_FL = [
    "--privacy.enabled", "true", "--privacy.delta", "1e-3", "--privacy.noise_multiplier", "1",
    "--data.balance", "none",
    "--federated.enabled", "true", "--federated.rounds", "1", "--federated.local_epochs", "1",
]  # fmt: skip


def build(name: str, size: int = SIZE) -> nn.Module:
    torch.manual_seed(0)
    return create_model(ModelConfig(name=name), image_size=size)


@pytest.mark.parametrize("name", NAMES)
def test_two_logits_the_parameter_count_and_no_batchnorm(name):
    model = build(name)
    assert model(torch.rand(3, 1, SIZE, SIZE)).shape == (3, 2)
    if name != "scatter_linear":  # shaped to its size (below)
        assert model(torch.rand(2, 1, 64, 64)).shape == (2, 2)  # the filters follow the size
    assert count_parameters(model) == PARAMETERS[name]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    check_private_model(model, name)


@pytest.mark.parametrize("name", NAMES)
def test_the_state_dict_holds_only_trained_weights_and_reloads(name):
    """The scattering filters are rebuilt, never saved: a state dict loads into a fresh build
    (and into one built on the meta device, as checkpoints are checked) and scores alike."""
    model = build(name).eval()
    images = torch.rand(2, 1, SIZE, SIZE)
    expected = model(images)
    state = model.state_dict()
    assert all(p in state for p, _ in model.named_parameters())
    assert not any(key.split(".")[-1] in {"psi0", "phi0", "rows"} for key in state)
    with torch.device("meta"):
        create_model(ModelConfig(name=name), image_size=SIZE).load_state_dict(state, assign=True)
    torch.manual_seed(1)
    fresh = create_model(ModelConfig(name=name), image_size=SIZE).eval()
    fresh.load_state_dict(state)
    assert torch.allclose(fresh(images), expected)


@pytest.mark.parametrize("name", ["scatter_linear", "scatter_cnn"])
def test_an_image_size_not_a_multiple_of_four_is_one_line(name):
    with pytest.raises(UserError) as refused:
        create_model(ModelConfig(name=name), image_size=30)
    assert "data.image_size 30" in str(refused.value) and "multiple of 4" in str(refused.value)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("size", [32, 64])
def test_scatter_linear_reads_the_whole_scattering_map(size):
    """Tramèr & Boneh's linear model: a weight for every class, channel and position of the
    81 x S/4 x S/4 map, none averaged away (64 px: 20,736 features a class)."""
    model = build("scatter_linear", size)
    side = size // 4
    assert model.fc.in_features == 81 * side * side
    assert count_parameters(model) == 81 * side * side * 2 + 2
    assert count_parameters(create_model(ModelConfig(name="scatter_linear"), size, 3)) == (
        81 * side * side * 3 + 3
    )
    assert model(torch.rand(2, 1, size, size)).shape == (2, 2)


def test_scatter_linear_without_an_image_size_or_at_another_is_one_line():
    for make in (
        lambda: create_model(ModelConfig(name="scatter_linear")),
        lambda: pneumonia.create_model("scatter_linear"),
    ):
        with pytest.raises(UserError) as refused:
            make()
        message = str(refused.value)
        assert "model scatter_linear" in message and "data.image_size" in message
        assert "\n" not in message
    with pytest.raises(UserError) as refused:
        build("scatter_linear", 64)(torch.rand(1, 1, SIZE, SIZE))
    assert str(refused.value).startswith("data.image_size 32: model scatter_linear was built")
    assert "\n" not in str(refused.value)
    # The other models take any size: their builders are not given one.
    assert count_parameters(create_model(ModelConfig(name="scatter_cnn"))) == 158_274


def test_an_ensemble_rebuilds_scatter_linear_members_at_their_size():
    member = {"model": {"name": "scatter_linear"}, "mean": 0.5, "std": 0.25,
              "image_size": 64, "classes": ["NORMAL", "PNEUMONIA"],
              "positive_class": "PNEUMONIA", "name": "m.ckpt"}  # fmt: skip
    spec = {"rule": "soft_vote", "members": [member, member], "coef": [0.5, 0.5], "intercept": 0}
    model = create_model(ModelConfig(name="ensemble", ensemble=spec), image_size=64)
    assert [m.fc.in_features for m in model.members] == [81 * 16 * 16] * 2
    assert model(torch.rand(2, 1, 64, 64)).shape == (2, 2)


def test_options_that_do_not_apply_are_one_line():
    with pytest.raises(UserError, match="model.norm bn: model wsgn_cnn .* GroupNorm only"):
        create_model(ModelConfig(name="wsgn_cnn", norm="bn"))
    with pytest.raises(UserError, match="model.width applies to the ResNet family"):
        create_model(ModelConfig(name="scatter_cnn", width=16))


@pytest.mark.parametrize("name", NAMES)
def test_each_image_gets_its_own_gradient_under_opacus(name):
    """Opacus's per-sample gradients (weight-standardised convolutions through its functorch
    fallback) equal each image's gradient computed alone."""
    probe_per_image_gradients(build(name), name, SIZE)
    model = build(name).double()
    images = torch.rand(3, 1, SIZE, SIZE, dtype=torch.float64)
    hooks = grad_sample_hooks(model, loss_reduction="sum")
    model(images).sum().backward()
    per_image = {n: p.grad_sample.clone() for n, p in model.named_parameters()}
    hooks.remove_hooks()
    for i in range(3):
        model.zero_grad()
        model(images[i : i + 1]).sum().backward()
        for n, p in model.named_parameters():
            assert torch.allclose(per_image[n][i], p.grad, atol=1e-10), n


def test_weight_standardisation_gives_each_filter_zero_mean_and_unit_variance():
    conv = WSConv2d(4, 6, 3)
    w = conv.standardised_weight()
    assert torch.allclose(w.mean(dim=(1, 2, 3)), torch.zeros(6), atol=1e-6)
    assert torch.allclose(w.var(dim=(1, 2, 3), unbiased=False), torch.ones(6), atol=1e-3)


def test_grad_cam_reads_the_last_convolution_or_refuses_in_one_line():
    with pytest.raises(UserError) as refused:
        target_layer(build("scatter_linear"))
    assert str(refused.value).startswith("Grad-CAM cannot explain model scatter_linear")
    assert "\n" not in str(refused.value)
    assert not explainable(build("scatter_linear"))
    for name in ("scatter_cnn", "wsgn_cnn"):
        model = build(name)
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert explainable(model) and target_layer(model) is convs[-1]


@pytest.fixture
def images(tmp_path):
    for k, mean in enumerate((60, 190)):
        write_image(tmp_path / "in" / f"{k}.png", mean, (40, 50), fmt="PNG", seed=k)
    return tmp_path / "in"


@pytest.mark.parametrize("name", NAMES)
def test_a_centralized_run_trains_and_its_checkpoint_predicts(name, tmp_path, images, capsys):
    run_dir = tmp_path / "run"
    summary = fit.main([*TINY, *CENTRAL, "--model.name", name, "--run_dir", str(run_dir)])
    assert summary["val"]["auroc"] >= 0
    out = capsys.readouterr().out
    # fit's panels: drawn where Grad-CAM has a layer, one line saying why not otherwise
    assert ("no Grad-CAM panels: Grad-CAM cannot explain model" in out) == (
        name == "scatter_linear"
    )
    assert (run_dir / "cases.png").is_file() == (name != "scatter_linear")
    ckpt = str(run_dir / "checkpoints" / "best.ckpt")
    code, out, _ = run_predict(capsys, "--ckpt", ckpt, str(images))
    assert code == 0 and out.count(f",{name},{SIZE},") == 2
    code, _, err = run_predict(capsys, "--ckpt", ckpt, "--cam", str(tmp_path / "cam"), str(images))
    if name == "scatter_linear":
        assert code == 2 and err.startswith("error: Grad-CAM cannot explain model scatter_linear")
    else:
        assert code == 0 and len(list((tmp_path / "cam").iterdir())) == 2
    if name == "scatter_linear":  # an ensemble rebuilds it from its recipe's size
        other = tmp_path / "other" / "checkpoints"
        other.mkdir(parents=True)
        shutil.copy(ckpt, other / "best.ckpt")
        shutil.copy(run_dir / "predictions.csv", other.parent / "predictions.csv")
        out = tmp_path / "e.ckpt"
        members = [ckpt, str(other / "best.ckpt")]
        ensemble.main(["--members", *members, "--out", str(out), "--folds", "2"])
        code, out_text, _ = run_predict(capsys, "--ckpt", str(out), str(images))
        assert code == 0 and out_text.count(f",ensemble,{SIZE},") == 2


@pytest.mark.parametrize("name", NAMES)
def test_a_private_federated_run_trains_and_reports_epsilon(name, tmp_path):
    summary = fit.main([*TINY, *PRIVATE_FL, "--model.name", name, "--run_dir", str(tmp_path)])
    assert summary["privacy"]["clients"]["epsilon"] > 0
    assert (tmp_path / "checkpoints" / "best.ckpt").is_file()


@pytest.mark.parametrize("name", ["scatter_linear", "scatter_cnn"])
def test_the_scattering_models_export_to_onnx_and_score_as_the_checkpoint(name, tmp_path):
    """The FFTs export (spectra travel as real tensors between them)."""
    from pneumonia.training.checkpoint import finish_checkpoint, read_checkpoint, write_checkpoint
    from pneumonia.training.recipe import Recipe, build_module

    torch.manual_seed(0)
    recipe = Recipe(model={"name": name}, optim={}, image_size=SIZE, mean=0.45, std=0.22)
    ckpt = tmp_path / "best.ckpt"
    write_checkpoint(ckpt, build_module(recipe).state_dict(), recipe, round_number=1)
    finish_checkpoint(ckpt, read_checkpoint(ckpt)[2], 0.5, {})
    export_onnx(ckpt, tmp_path / "model.onnx")
    pixels = torch.randint(0, 256, (4, 1, SIZE, SIZE), dtype=torch.uint8)
    onnx = OnnxPredictor(tmp_path / "model.onnx").probabilities(pixels)
    torch_probs = Predictor.from_checkpoint(ckpt).probabilities(pixels)
    assert torch.allclose(torch.as_tensor(onnx).float(), torch_probs.float(), atol=1e-5)


def scatter_module(name: str = "scatter_cnn"):
    recipe = Recipe(model={"name": name}, optim={"name": "sgd", "lr": 0.1}, image_size=SIZE)
    torch.manual_seed(0)
    return build_module(recipe).eval()


def test_cached_front_end_features_equal_a_fresh_computation_and_are_computed_once():
    module = scatter_module()
    images = torch.randint(0, 256, (5, 1, SIZE, SIZE), dtype=torch.uint8)
    features = module.fixed_features(images)
    normalised = (images.float() / 255.0 - module.hparams["mean"]) / module.hparams["std"]
    assert torch.allclose(features, module.model.features(normalised), atol=1e-6)
    assert module.fixed_features(images) is features  # served from memory the second time
    assert module.fixed_features(images.clone()) is not features  # another image set
    with torch.no_grad():
        assert torch.allclose(module(features), module(images), atol=1e-5)
    # the scores of a checkpoint are the same through the cache
    direct = module.positive_probability(module(images)).detach()
    assert torch.allclose(predict_probabilities(module, images), direct, atol=1e-5)
    assert scatter_module("wsgn_cnn").fixed_features(images) is None  # no fixed front end


def test_without_augmentation_training_reads_the_features_computed_once(tmp_path, caplog):
    argv = [*TINY, *CENTRAL, "--model.name", "scatter_cnn", "--data.augment.enabled", "false"]
    with caplog.at_level(logging.INFO, logger="pneumonia.training.module"):
        fit.main([*argv, "--trainer.max_epochs", "2", "--run_dir", str(tmp_path / "r")])
    computed = [r.getMessage() for r in caplog.records if "front end computed once" in r.message]
    # train, val and val_shift: once each for both epochs, and not again to score the model
    assert len(computed) == 3, computed
