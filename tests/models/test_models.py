"""Models: every registered network trains at a small size; the paper's SE and GN settings."""

import pytest
import timm
import torch
from timm.layers import SEModule
from torch import nn

from pneumonia.core.errors import UserError
from pneumonia.models.factory import (
    MODELS,
    ModelConfig,
    check_image_size,
    count_parameters,
    create_model,
)

SMALL = 64  # the smallest size every registered model (AlexNet's pooling) accepts


@pytest.mark.parametrize(
    "name,norm",
    [
        ("se_resnet18", "gn"),
        ("se_resnet18", "bn"),
        ("resnet18", "gn"),
        ("resnet18", "bn"),
        ("alexnet", "gn"),
        ("vgg16", "gn"),
        ("timm/resnet10t", "bn"),
    ],
)
def test_forward_backward_one_channel_two_classes(name, norm):
    model = create_model(ModelConfig(name=name, norm=norm), image_size=SMALL)
    images = torch.randn(2, 1, SMALL, SMALL)
    logits = model(images)
    assert logits.shape == (2, 2)
    logits.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def _modules(model, kind):
    return [m for m in model.modules() if isinstance(m, kind)]


def test_se_resnet_gn_has_16_groups_and_no_batchnorm():
    model = create_model(ModelConfig(name="se_resnet18", norm="gn"))
    norms = _modules(model, nn.GroupNorm)
    # stem + 2 per block x 8 blocks + 3 downsample shortcuts
    assert len(norms) == 1 + 16 + 3
    assert {m.num_groups for m in norms} == {16}
    assert not _modules(model, nn.BatchNorm2d)


def test_se_block_in_every_residual_block_with_reduction_16():
    model = create_model(ModelConfig(name="se_resnet18", norm="gn"))
    blocks = [
        b for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for b in stage
    ]
    assert len(blocks) == 8
    for block in blocks:
        assert isinstance(block.se, SEModule)
        channels = block.conv2.out_channels
        # r = 16 exactly: 64 -> 4, not timm's default rounding up to 8
        assert block.se.fc1.out_channels == channels // 16
    assert model.layer1[0].se.fc1.out_channels == 4


def test_se_resnet18_is_resnet18_depth():
    model = create_model(ModelConfig(name="se_resnet18", norm="bn"))
    convs = [
        m
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and "se." not in n and "downsample" not in n
    ]
    assert len(convs) == 17  # 7x7 stem + 16 block convolutions
    assert convs[0].kernel_size == (7, 7) and convs[0].out_channels == 64
    assert convs[0].in_channels == 1
    assert len(_modules(model, nn.BatchNorm2d)) == 1 + 16 + 3


def test_se_reweights_the_residual_branch_before_the_addition():
    model = create_model(ModelConfig(name="se_resnet18", norm="gn")).eval()
    block = model.layer1[0]
    x = torch.randn(1, 64, 8, 8)
    seen = {}
    # clone: the block adds the shortcut in place into the SE output
    block.se.register_forward_hook(lambda m, i, o: seen.update(inp=i[0].clone(), out=o.clone()))
    out = block(x)
    gate = torch.sigmoid(block.se.fc2(torch.relu(block.se.fc1(seen["inp"].mean((2, 3), True)))))
    assert torch.allclose(seen["out"], seen["inp"] * gate, atol=1e-6)  # SE rescales channels
    # the block adds the SE output to its identity shortcut, then applies ReLU
    assert torch.allclose(out, torch.relu(seen["out"] + x), atol=1e-6)


def test_resnet18_has_no_se():
    model = create_model(ModelConfig(name="resnet18", norm="gn"))
    assert not _modules(model, SEModule)


def test_unknown_model_lists_valid_names():
    with pytest.raises(UserError, match="unknown model.name 'resnet99'.*se_resnet18.*timm/<any"):
        create_model(ModelConfig(name="resnet99"))
    assert "alexnet" in MODELS and "vgg16" in MODELS


def test_unknown_timm_model():
    with pytest.raises(UserError, match="timm model 'nope_net'"):
        create_model(ModelConfig(name="timm/nope_net"))


def test_image_size_too_small_for_alexnet():
    with pytest.raises(UserError, match="image_size 32 is too small for model alexnet"):
        create_model(ModelConfig(name="alexnet"), image_size=32)


class OutOfMemory(nn.Linear):
    """A model whose forward pass fails as torch's CPU allocator does for a huge image."""

    def forward(self, images):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: "
            "you tried to allocate 14400000000 bytes"
        )


def test_an_image_size_without_the_memory_is_too_large_not_too_small():
    with pytest.raises(UserError) as err:
        check_image_size(OutOfMemory(1, 1), "se_resnet18", 2048)
    assert str(err.value).startswith("data.image_size 2048 is too large for model se_resnet18")


class NoMetaKernel(nn.Linear):
    """A model with an operation that has no meta kernel (as some timm layers may)."""

    def forward(self, images):
        raise NotImplementedError("Could not run 'aten::op' with arguments from the 'Meta' backend")


def test_a_meta_model_without_meta_kernels_is_left_to_the_real_build_to_check():
    with torch.device("meta"):  # how checkpoint.module_from first builds a file's model
        check_image_size(NoMetaKernel(1, 1), "timm/x", 32)
    with pytest.raises(UserError, match="image_size 32 is too small for model timm/x"):
        check_image_size(NoMetaKernel(1, 1), "timm/x", 32)  # on the CPU: it cannot run


def test_gn_groups_must_divide_channels():
    with pytest.raises(UserError, match="gn_groups 12"):
        create_model(ModelConfig(name="se_resnet18", gn_groups=12))


def test_pretrained_rgb_weights_from_local_file(tmp_path):
    source = timm.create_model("resnet18", pretrained=False)  # a stand-in for ImageNet weights
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(source.state_dict(), path)
    model = create_model(ModelConfig(name="se_resnet18", norm="bn", pretrained=str(path)))
    expected_stem = source.conv1.weight.sum(dim=1, keepdim=True)  # RGB summed to one channel
    assert torch.allclose(model.conv1.weight, expected_stem)
    assert torch.equal(model.layer3[1].conv2.weight, source.layer3[1].conv2.weight)
    assert model.fc.weight.shape == (2, 512)  # the 1000-class head is not copied


def test_pretrained_weights_of_another_network_are_refused(tmp_path):
    path = tmp_path / "alexnet.pth"
    torch.save(create_model(ModelConfig(name="alexnet")).state_dict(), path)
    with pytest.raises(UserError, match="no tensor in .*alexnet.pth fits"):
        create_model(ModelConfig(name="se_resnet18", pretrained=str(path)))


def test_width_scales_every_stage_of_the_resnet_family():
    model = create_model(ModelConfig(name="se_resnet18", norm="gn", width=16))
    assert model.conv1.out_channels == 64  # timm's stem does not scale
    stages = (model.layer1, model.layer2, model.layer3, model.layer4)
    assert [stage[-1].conv2.out_channels for stage in stages] == [16, 32, 64, 128]
    assert model.layer1[0].se.fc1.out_channels == 1  # 16 / r=16
    assert model.fc.in_features == 128
    # Paper width: 11.26 M parameters; a quarter of the width leaves about 1/16 of them.
    paper = count_parameters(create_model(ModelConfig(name="se_resnet18", norm="gn")))
    assert paper == 11_260_346
    assert count_parameters(model) == 717_152


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (ModelConfig(name="alexnet", width=16), "model.width applies to the ResNet family"),
        (ModelConfig(name="se_resnet18", width=24), "se_reduction 16 must divide model.width 24"),
        (ModelConfig(name="resnet18", width=8), "model.gn_groups 16 must divide model.width 8"),
        (ModelConfig(name="resnet18", width=0), "model.width 0 must be a positive"),
    ],
)
def test_width_errors_name_the_key(cfg, message):
    with pytest.raises(UserError, match=message):
        create_model(cfg)
