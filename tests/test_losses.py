"""The training losses against values worked out by hand on 2-3 images, their heads and
probes on tiny models, and the registry's config errors."""

import copy
import math
import typing

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pneumonia.models  # noqa: F401  (fills the model registry)
from pneumonia.core.errors import UserError
from pneumonia.models.factory import ModelConfig, create_model
from pneumonia.training.losses import (
    LOSS_NAMES,
    LOSSES,
    EmbeddingTap,
    L2SoftmaxLinear,
    LossConfig,
    LossName,
    MarginHead,
    attach_head,
    classifier_layer,
    make_objective,
)

LOGITS = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
LABELS = torch.tensor([0, 1, 1])
WEIGHTS = torch.tensor([1.0, 3.0])
# -log p_y of the three images: log(1 + e^-2), log(1 + e^-1), log 2
NLL = [math.log1p(math.exp(-2)), math.log1p(math.exp(-1)), math.log(2)]


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def tiny_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))


def objective_for(name: str, model: nn.Module | None = None, **cfg):
    """The objective of loss `name` on a tiny Linear(D, 2) classifier (D = 2 by default)."""
    cfg = LossConfig(name=name, **cfg)
    model = model if model is not None else nn.Sequential(nn.Linear(2, 2))
    attach_head(model, cfg)
    return make_objective(cfg, model), model


def loss_of(name, logits=LOGITS, embeddings=None, labels=LABELS, weights=None, smooth=0.0, **cfg):
    objective, _ = objective_for(name, **cfg)
    return objective(logits, embeddings, labels, weights, smooth).item()


# --- each loss by hand ---------------------------------------------------------------


def test_cross_entropy_is_the_modules_loss_bit_for_bit():
    objective, _ = objective_for("cross_entropy")
    logits = torch.randn(5, 2, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 1, 0, 1])
    loss = objective(logits, None, labels, WEIGHTS, 0.1)
    expected = F.cross_entropy(logits.float(), labels, weight=WEIGHTS, label_smoothing=0.1)
    assert torch.equal(loss, expected)
    weighted = (NLL[0] + 3 * NLL[1] + 3 * NLL[2]) / 7
    assert loss_of("cross_entropy", weights=WEIGHTS) == pytest.approx(weighted, rel=1e-6)


def test_softmax_ignores_weights_and_smoothing():
    loss = loss_of("softmax", weights=WEIGHTS, smooth=0.2)
    assert loss == pytest.approx(sum(NLL) / 3, rel=1e-6)


def test_mse_is_the_weighted_brier_score():
    # For 2 classes sum_k (p_k - onehot_k)^2 = 2 (1 - p_y)^2.
    per_image = [2 * (1 - sigmoid(2)) ** 2, 2 * (1 - sigmoid(1)) ** 2, 2 * 0.5**2]
    assert loss_of("mse") == pytest.approx(sum(per_image) / 3, rel=1e-6)
    weighted = (per_image[0] + 3 * per_image[1] + 3 * per_image[2]) / 7
    assert loss_of("mse", weights=WEIGHTS) == pytest.approx(weighted, rel=1e-6)


def test_hinge_on_the_logit_margin_divided_by_the_class_count():
    # margin 2: max(0, 2 - (z_y - z_other)) / 2 = 0, 1/2, 1
    assert loss_of("hinge", margin=2.0) == pytest.approx(0.5)
    # weights multiply each image's term; the mean still divides by the batch size
    assert loss_of("hinge", margin=2.0, weights=WEIGHTS) == pytest.approx((1.5 + 3) / 3)


def test_focal_with_alpha_with_weights_and_its_cross_entropy_limit():
    p = [sigmoid(2), sigmoid(1), 0.5]  # p_t of the three images
    focal = [(1 - pt) ** 2 * -math.log(pt) for pt in p]
    # alpha 0.25 for PNEUMONIA (index 1), 0.75 for the NORMAL image
    alpha = (0.75 * focal[0] + 0.25 * focal[1] + 0.25 * focal[2]) / 3
    assert loss_of("focal", alpha=0.25) == pytest.approx(alpha, rel=1e-6)
    weighted = (focal[0] + 3 * focal[1] + 3 * focal[2]) / 3
    assert loss_of("focal", weights=WEIGHTS) == pytest.approx(weighted, rel=1e-6)
    assert loss_of("focal", gamma=0.0) == pytest.approx(F.cross_entropy(LOGITS, LABELS).item())


def test_focal_alpha_follows_the_positive_class_index():
    cfg = LossConfig(name="focal", alpha=0.25, gamma=0.0)
    normal_positive = make_objective(cfg, nn.Linear(2, 2), positive=0)
    loss = normal_positive(LOGITS, None, LABELS, None, 0.0).item()
    assert loss == pytest.approx((0.25 * NLL[0] + 0.75 * NLL[1] + 0.75 * NLL[2]) / 3, rel=1e-6)


def test_l2_softmax_head_scales_the_normalised_embedding():
    objective, model = objective_for("l2_softmax", l2_alpha=10.0)
    head = model[0]
    assert type(head) is L2SoftmaxLinear
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
        head.bias.copy_(torch.tensor([0.5, -0.5]))
    x = torch.tensor([[3.0, 4.0], [0.0, -2.0]])
    logits = model(x)  # 10 * (0.6, 0.8) + b, 10 * (0, -1) + b
    assert torch.allclose(logits, torch.tensor([[6.5, 7.5], [0.5, -10.5]]))
    labels = torch.tensor([1, 0])
    loss = objective(logits, x, labels, None, 0.0).item()
    assert loss == pytest.approx((math.log1p(math.exp(-1)) + math.log1p(math.exp(-11))) / 2)


def test_center_adds_half_the_mean_squared_distance_to_the_class_center():
    objective, _ = objective_for("center", center_weight=0.1)
    with torch.no_grad():
        objective.centers.copy_(torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    logits = torch.zeros(2, 2)  # cross-entropy log 2
    loss = objective(logits, embeddings, torch.tensor([0, 1]), None, 0.0).item()
    # ||e - c_y||^2 = 1 and 4: 0.1 * 0.5 * 2.5
    assert loss == pytest.approx(math.log(2) + 0.125, rel=1e-6)


def zero_probe(objective) -> None:
    with torch.no_grad():
        objective.layer.weight.zero_()
        objective.layer.bias.zero_()  # probe logits 0: cross-entropy log 2


def test_euclidean_regresses_onto_unit_vectors_plus_the_probe():
    objective, _ = objective_for("euclidean", model=nn.Sequential(nn.Linear(3, 2)))
    zero_probe(objective)
    embeddings = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    loss = objective(torch.zeros(2, 2), embeddings, torch.tensor([0, 1]), None, 0.0).item()
    # targets (1,0,0) and (0,1,0): squared distances 0 and 5
    assert loss == pytest.approx(0.5 * 2.5 + math.log(2), rel=1e-6)


def test_contrastive_over_all_pairs_of_normalised_embeddings_plus_the_probe():
    objective, _ = objective_for("contrastive", margin=1.0)
    zero_probe(objective)
    # Unit directions at 0, 90 and 30 degrees (b and c scaled: pml normalises them).
    a, b, c = [1.0, 0.0], [0.0, 3.0], [2 * math.cos(math.pi / 6), 2 * math.sin(math.pi / 6)]
    embeddings = torch.tensor([a, b, c])
    labels = torch.tensor([0, 1, 1])
    loss = objective(torch.zeros(3, 2), embeddings, labels, None, 0.0).item()
    # like pair b-c: distance 2 sin 30 = 1; unlike a-b: sqrt 2 > margin, 0; unlike a-c:
    # 2 sin 15 < margin, 1 - 2 sin 15 (the one non-zero unlike pair: pml averages non-zero ones)
    pairs = 1.0 + (1 - 2 * math.sin(math.pi / 12))
    assert loss == pytest.approx(pairs + math.log(2), rel=1e-5)


def margin_model(name: str, w0, w1, **cfg):
    """A margin head on D = 4 with class weight vectors w0 and w1 set by hand."""
    objective, model = objective_for(name, model=nn.Sequential(nn.Linear(4, 2)), **cfg)
    head = model[0]
    assert isinstance(head, MarginHead)
    with torch.no_grad():
        head.loss.W.copy_(torch.tensor([w0, w1]).t())
    return objective, model


def test_cosface_head_logits_are_s_cos_and_its_loss_subtracts_the_margin():
    objective, model = margin_model("cosface", [2, 0, 0, 0], [0, 1, 0, 0], scale=16.0)
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    logits = model(x)
    r = 16 / math.sqrt(2)
    assert torch.allclose(logits, torch.tensor([[16.0, 0.0], [r, r]]))
    loss = objective(logits, x, torch.tensor([0, 1]), None, 0.0).item()
    m = 0.35  # -log softmax with s (cos - m) for the target class
    first = math.log1p(math.exp(-16 * (1 - m)))
    second = math.log1p(math.exp(16 * m))
    assert loss == pytest.approx((first + second) / 2, rel=1e-5)


# x at 30 degrees from class 0's direction (e1) and 60 from class 1's (e2), ||x|| = 2.
X30 = torch.tensor([[2 * math.cos(math.pi / 6), 1.0, 0.0, 0.0]])


def test_sphereface_logits_are_norm_times_cos_and_m_multiplies_the_angle():
    objective, model = margin_model("a_softmax", [3, 0, 0, 0], [0, 1, 0, 0], angular_margin=4)
    logits = model(X30)
    assert torch.allclose(logits, torch.tensor([[2 * math.cos(math.pi / 6), 1.0]]))
    loss = objective(logits, X30, torch.tensor([0]), None, 0.0).item()
    # psi(30 deg) = cos(4 x 30 deg) = -0.5 (k = 0): target logit -1 against 1
    assert loss == pytest.approx(math.log1p(math.exp(2)), rel=1e-5)
    objective, model = margin_model("a_softmax", [3, 0, 0, 0], [0, 1, 0, 0], angular_margin=1)
    loss = objective(model(X30), X30, torch.tensor([0]), None, 0.0).item()
    assert loss == pytest.approx(F.cross_entropy(model(X30), torch.tensor([0])).item(), rel=1e-5)


def test_l_softmax_logits_are_the_dot_product_and_m_multiplies_the_angle():
    objective, model = margin_model("l_softmax", [2, 0, 0, 0], [0, 1, 0, 0], angular_margin=4)
    logits = model(X30)
    assert logits.shape == (1, 2)
    assert torch.allclose(logits, torch.tensor([[4 * math.cos(math.pi / 6), 1.0]]))
    loss = objective(logits, X30, torch.tensor([0]), None, 0.0).item()
    # ||W_0|| ||x|| psi = 2 x 2 x (-0.5) = -2 against 1 x 2 x cos 60 = 1
    assert math.isfinite(loss)
    assert loss == pytest.approx(math.log1p(math.exp(3)), rel=1e-5)


def test_margin_heads_keep_float32_weights_under_bf16_autocast():
    objective, model = margin_model("cosface", [1, 0, 0, 0], [0, 1, 0, 0])
    x = torch.randn(3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        objective(logits, x, torch.tensor([0, 1, 1]), None, 0.0).backward()
    assert model[0].loss.W.dtype == torch.float32 and logits.dtype == torch.float32


# --- heads, taps and probes on models --------------------------------------------------


def test_attach_head_default_leaves_the_model_and_margin_replaces_the_linear():
    model = tiny_model()
    keys = list(model.state_dict())
    attach_head(model, LossConfig())
    assert list(model.state_dict()) == keys and type(model[3]) is nn.Linear
    linear = model[3]
    attach_head(model, LossConfig(name="cosface"))
    head = model[3]
    assert isinstance(head, MarginHead)
    assert torch.equal(head.loss.W, linear.weight.t())  # the Linear's initialisation
    assert list(model.state_dict()) == ["1.weight", "1.bias", "3.loss.W"]
    x = torch.randn(3, 6)
    with EmbeddingTap(model) as tap:
        logits = model(x)
        assert torch.equal(logits, head(tap.embeddings))
    assert logits.shape == (3, 2)


def test_attach_head_l2_softmax_keeps_the_linear_keys_and_weights():
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    attach_head(model, LossConfig(name="l2_softmax"))
    assert type(model[3]) is L2SoftmaxLinear
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_classifier_layer_of_registry_and_torchvision_style_models():
    resnet = create_model(ModelConfig(name="resnet18", width=16), 32)
    assert classifier_layer(resnet) == (resnet, "fc")
    attach_head(resnet, LossConfig(name="a_softmax"))
    assert isinstance(resnet.fc, MarginHead)
    assert resnet(torch.zeros(2, 1, 32, 32)).shape == (2, 2)

    class Vgg(nn.Module):  # torchvision's layout: the classifier's last Linear is index 6
        def __init__(self):
            super().__init__()
            self.features = nn.Linear(6, 2)  # 2 outputs too, but not the last
            self.classifier = nn.Sequential(*[nn.Identity()] * 6, nn.Linear(2, 2))

    vgg = Vgg()
    assert classifier_layer(vgg) == (vgg.classifier, "6")


def test_classifier_layer_missing_is_a_one_line_error():
    with pytest.raises(UserError) as err:
        classifier_layer(nn.Sequential(nn.Conv2d(1, 2, 1)))
    assert "\n" not in str(err.value) and "loss.name" in str(err.value)


def test_embedding_tap_records_the_classifier_input():
    model = tiny_model()
    tap = EmbeddingTap(model)
    x = torch.randn(3, 6)
    model(x)
    assert torch.equal(tap.embeddings, model[:3](x))
    copy.deepcopy(model)(x)  # weight averaging copies the model, hook and tap included
    tap.remove()
    model(torch.randn(1, 6))
    assert tap.embeddings is None


@pytest.mark.parametrize("name", ["contrastive", "euclidean"])
def test_the_probe_gives_the_backbone_no_gradient(name):
    model = tiny_model()
    objective = make_objective(LossConfig(name=name), model)
    tap = EmbeddingTap(model)
    x, labels = torch.randn(4, 6), torch.tensor([0, 1, 1, 0])

    def grads(loss_fn):
        model.zero_grad(set_to_none=True)
        logits = model(x)
        loss_fn(logits, tap.embeddings).backward()
        return [p.grad for p in model[1].parameters()], model[3].weight.grad

    total, probe_grad = grads(lambda z, e: objective(z, e, labels, None, 0.0))
    alone, _ = grads(lambda z, e: objective.embedding_loss(e.float(), labels))
    assert all(torch.allclose(t, a) for t, a in zip(total, alone, strict=True))
    assert probe_grad is not None and probe_grad.abs().sum() > 0  # the probe itself learns


def test_only_center_holds_state():
    for name in LOSS_NAMES:
        objective, _ = objective_for(name)
        expected = ["centers"] if name == "center" else []
        assert list(objective.state_dict()) == expected, name
    assert list(objective_for("cross_entropy")[0].buffers()) == []


# --- every loss ------------------------------------------------------------------------


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_an_empty_batch_gives_zero_with_a_graph(name):
    objective, model = objective_for(name, model=tiny_model())
    tap = EmbeddingTap(model)
    logits = model(torch.zeros(0, 6))
    loss = objective(logits, tap.embeddings, torch.zeros(0, dtype=torch.long), WEIGHTS, 0.1)
    assert loss.item() == 0 and loss.dtype == torch.float32 and loss.grad_fn is not None
    loss.backward()


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_every_loss_trains_a_tiny_model_one_step(name):
    objective, model = objective_for(name, model=tiny_model())
    tap = EmbeddingTap(model)
    params = [*model.parameters(), *objective.parameters()]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=0.1)
    x, labels = torch.randn(4, 6), torch.tensor([0, 1, 1, 1])  # a single-class pair too
    loss = objective(model(x), tap.embeddings, labels, WEIGHTS, 0.1)
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, params, strict=True))
    one_class = objective(model(x), tap.embeddings, torch.ones(4, dtype=torch.long), None, 0.0)
    assert torch.isfinite(one_class)


# --- the registry and the config ---------------------------------------------------------


def test_unknown_loss_name_is_one_line_naming_the_key_and_every_choice():
    with pytest.raises(UserError) as err:
        make_objective(LossConfig(name="arcface"), nn.Linear(2, 2))
    line = str(err.value)
    assert "\n" not in line and line.startswith("unknown loss.name 'arcface'")
    assert all(name in line for name in LOSSES.names())
    with pytest.raises(UserError):
        attach_head(nn.Linear(2, 2), LossConfig(name="arcface"))


def test_the_config_literal_is_the_registry():
    assert typing.get_args(LossName) == LOSS_NAMES == LOSSES.names()
    assert typing.get_type_hints(LossConfig)["name"] == LossName
    assert LossConfig().name == "cross_entropy"


def test_the_parser_checks_the_name_and_the_ranges():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--loss", type=LossConfig, default=LossConfig())
    cfg = parser.parse_args(["--loss.name", "focal", "--loss.alpha", "0.25"])
    assert (cfg.loss.name, cfg.loss.alpha) == ("focal", 0.25)
    for bad in (["--loss.name", "arcface"], ["--loss.alpha", "1"], ["--loss.angular_margin", "0"]):
        with pytest.raises(Exception):  # noqa: B017  (jsonargparse's ArgumentError)
            parser.parse_args(bad)
