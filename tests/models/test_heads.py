"""model.head: the thesis's head on every registry model, and other class counts."""

import pytest
import torch
from torch import nn

from pneumonia.models.factory import ModelConfig, create_model
from pneumonia.models.heads import HIDDEN, classifier_layer

THESIS_ORDER = [
    nn.BatchNorm1d,
    nn.Dropout,
    nn.Linear,
    nn.ReLU,
    nn.BatchNorm1d,
    nn.Dropout,
    nn.Linear,
]


def _head(model, num_classes):
    parent, _ = classifier_layer(model, num_classes)
    return parent


def test_thesis_head_is_bn_dropout_linear256_bn_dropout_out():
    model = create_model(ModelConfig(name="resnet18", norm="bn", width=16, head="thesis"), 32, 3)
    head = _head(model, 3)
    assert [type(m) for m in head] == THESIS_ORDER
    assert head[2].in_features == 128 and head[2].out_features == HIDDEN  # width 16: 128 features
    assert head[6].out_features == 3 and head[1].p == 0.5
    model.eval()
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 3)


def test_group_norm_replaces_batch_norm_in_the_head_when_norm_is_gn():
    cfg = ModelConfig(name="se_resnet18", norm="gn", width=16, head="thesis", head_dropout=0.2)
    head = _head(create_model(cfg, 32), 2)
    norms = [m for m in head if isinstance(m, nn.GroupNorm | nn.BatchNorm1d)]
    assert [type(m) for m in norms] == [nn.GroupNorm, nn.GroupNorm]
    assert norms[0].num_groups == 16 and norms[1].num_channels == HIDDEN
    assert head[1].p == 0.2
    assert not any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in create_model(cfg).modules()
    )


def test_three_classes_get_a_three_output_linear_and_the_default_stays_as_built():
    torch.manual_seed(0)
    two = create_model(ModelConfig(name="resnet18", width=16))
    torch.manual_seed(0)
    again = create_model(ModelConfig(name="resnet18", width=16))
    assert two.fc.out_features == 2
    assert all(
        torch.equal(a, b)
        for a, b in zip(two.state_dict().values(), again.state_dict().values(), strict=True)
    )
    three = create_model(ModelConfig(name="resnet18", width=16), num_classes=3)
    assert isinstance(three.fc, nn.Linear) and three.fc.out_features == 3


@pytest.mark.parametrize("name", ["alexnet", "vgg16"])
def test_torchvision_mlps_give_way_to_the_head_on_global_pooling(name):
    model = create_model(ModelConfig(name=name, norm="bn", head="thesis"), 64).eval()
    assert isinstance(model.avgpool, nn.AdaptiveAvgPool2d) and model.avgpool.output_size == 1
    assert [type(m) for m in model.classifier] == THESIS_ORDER
    assert model(torch.zeros(1, 1, 64, 64)).shape == (1, 2)


def test_vgg19_by_its_timm_name_takes_the_head():
    with torch.device("meta"):  # 140 M parameters: the structure is what is checked
        model = create_model(
            ModelConfig(name="timm/vgg19", norm="bn", head="thesis"), num_classes=3
        )
    head = _head(model, 3)
    assert [type(m) for m in head] == THESIS_ORDER and head[2].in_features == 4096


@pytest.mark.parametrize(("name", "size"), [("timm/densenet169", 32), ("timm/inception_v3", 75)])
def test_timm_models_take_the_head_at_sizes_they_accept(name, size):
    model = create_model(ModelConfig(name=name, norm="bn", head="thesis"), size, 3).eval()
    assert [type(m) for m in _head(model, 3)] == THESIS_ORDER
    assert model(torch.zeros(2, 1, size, size)).shape == (2, 3)
