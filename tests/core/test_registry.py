"""The generic Registry, and a misspelt name through each of the package's six registries."""

import pytest
from torch import nn

import pneumonia.models  # noqa: F401  (fills the model registry)
from pneumonia.core.errors import UserError
from pneumonia.core.registry import Registry
from pneumonia.federated.options import FederatedConfig, check_federated
from pneumonia.federated.strategies import create_strategy
from pneumonia.models.factory import ModelConfig, create_model
from pneumonia.models.layers import activation_layer
from pneumonia.training.losses import LossConfig, make_objective
from pneumonia.training.module import OptimConfig
from pneumonia.training.optimizers import make_optimizer
from pneumonia.training.schedules import DecayConfig, decay_factor


def optimizers(**options) -> Registry:
    registry = Registry("optim.name", **options)
    for name in ("sgd", "adamw", "adam"):
        registry.register(name, fused=name != "sgd")(name.upper())
    return registry


def test_register_is_a_decorator_that_returns_the_object():
    registry = Registry("loss.name")

    @registry.register("focal", head=False)
    def focal():
        return 1

    assert focal() == 1 and registry.get("focal") is focal
    assert "focal" in registry and "softmax" not in registry and len(registry) == 1


def test_names_in_registration_order_or_sorted():
    assert optimizers().names() == ("sgd", "adamw", "adam")
    assert list(optimizers()) == ["sgd", "adamw", "adam"]
    assert optimizers(sort=True).names() == ("adam", "adamw", "sgd")


def test_tags_select_names():
    assert optimizers().names(fused=True) == ("adamw", "adam")
    assert optimizers().names(fused=False) == ("sgd",)
    assert optimizers().names(missing=True) == ()


def test_a_wrong_name_is_one_line_with_the_closest_name_and_every_choice():
    with pytest.raises(UserError) as err:
        optimizers().get("adamww")
    assert str(err.value) == (
        "unknown optim.name 'adamww': did you mean 'adamw'? choose one of sgd, adamw, adam"
    )


def test_no_suggestion_when_nothing_is_close():
    with pytest.raises(UserError) as err:
        optimizers().get("lbfgs")
    assert str(err.value) == "unknown optim.name 'lbfgs': choose one of sgd, adamw, adam"


def test_the_caller_may_name_another_key_and_extra_choices_are_listed_last():
    registry = optimizers(extra_choices=("timm/<any>",))
    with pytest.raises(UserError) as err:
        registry.get("sdg", key="server.optim")
    assert str(err.value) == (
        "unknown server.optim 'sdg': did you mean 'sgd'? choose one of sgd, adamw, adam, timm/<any>"
    )


def test_registering_a_name_twice_is_a_programming_error():
    registry = optimizers()
    with pytest.raises(ValueError, match="optim.name 'sgd' is already registered") as err:
        registry.register("sgd")("another")
    assert not isinstance(err.value, UserError)
    assert registry.get("sgd") == "SGD"


@pytest.mark.parametrize(
    "lookup, line",
    [
        (
            lambda: create_model(ModelConfig(name="se_resnet81")),
            "unknown model.name 'se_resnet81': did you mean 'se_resnet18'? choose one of alexnet,",
        ),
        (
            lambda: activation_layer("prelus"),
            "unknown model.activation 'prelus': did you mean 'prelu'? choose one of relu,",
        ),
        (
            lambda: create_strategy(FederatedConfig(strategy="fedadm"), nn.Linear(1, 1)),
            "unknown federated.strategy 'fedadm': did you mean 'fedadam'? choose one of fedadam,",
        ),
        (
            lambda: check_federated(FederatedConfig(strategy="fedprx")),
            "unknown federated.strategy 'fedprx': did you mean 'fedprox'? choose one of",
        ),
        (
            lambda: make_objective(LossConfig(name="focall"), nn.Linear(2, 2)),
            "unknown loss.name 'focall': did you mean 'focal'? choose one of cross_entropy,",
        ),
        (
            lambda: make_optimizer([], OptimConfig(name="adamww")),
            "unknown optim.name 'adamww': did you mean 'adamw'? choose one of sgd,",
        ),
        (
            lambda: decay_factor("cosin", 0, 10, DecayConfig(), key="federated.round_lr"),
            "unknown federated.round_lr 'cosin': did you mean 'cosine'? choose one of constant,",
        ),
    ],
)
def test_each_registry_suggests_the_closest_name(lookup, line):
    with pytest.raises(UserError) as err:
        lookup()
    assert "\n" not in str(err.value) and str(err.value).startswith(line)


def test_the_model_refusal_lists_timm_models_too():
    with pytest.raises(UserError, match=r", wsgn_cnn, timm/<any timm model>$"):
        create_model(ModelConfig(name="vgg61"))
