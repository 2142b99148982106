"""The ResNet family's attention (`model.attention`): SE, CBAM and ECA computed by hand, counts
against timm's own models, every depth x attention x norm trains, the thesis's CBAM-ResNet-50."""

import hashlib

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import EcaModule, SEModule
from timm.layers.cbam import CbamModule

from pneumonia.core.errors import UserError
from pneumonia.models.attention import cbam_layer, se_layer
from pneumonia.models.factory import ModelConfig, count_parameters, create_model

TINY = {"width": 16, "gn_groups": 16, "se_reduction": 16}
SIZE = 32
FAMILY = ["resnet18", "resnet34", "resnet50", "se_resnet18", "se_resnet34", "se_resnet50"]


def _attention_modules(model):
    return [m for m in model.modules() if isinstance(m, (SEModule, CbamModule, EcaModule))]


def _blocks(model):
    return [b for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for b in stage]


# --- the blocks, by hand -------------------------------------------------------------------


def test_se_is_x_times_sigmoid_of_the_squeezed_mean():
    se = se_layer(ModelConfig(width=4, se_reduction=2))(4)
    with torch.no_grad():
        se.fc1.weight.copy_(torch.tensor([[1.0, 0, -1, 0], [0, 2, 0, -1]]).view(2, 4, 1, 1))
        se.fc1.bias.copy_(torch.tensor([0.1, -0.2]))
        se.fc2.weight.copy_(torch.tensor([[1.0, 0], [0, 1], [-1, 1], [0.5, -0.5]]).view(4, 2, 1, 1))
        se.fc2.bias.copy_(torch.tensor([0.0, 0.3, 0, -0.1]))
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    squeezed = x.mean((2, 3))  # [2, 4]
    hidden = torch.relu(squeezed @ se.fc1.weight.view(2, 4).T + se.fc1.bias)
    gate = torch.sigmoid(hidden @ se.fc2.weight.view(4, 2).T + se.fc2.bias)
    assert se.fc1.out_channels == 2  # C/r exactly
    assert torch.allclose(se(x), x * gate[:, :, None, None], atol=1e-6)


@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_cbam_is_the_channel_gate_then_the_spatial_gate(norm):
    cbam = cbam_layer(ModelConfig(width=4, se_reduction=2, norm=norm))(4).eval()
    mlp_in = torch.tensor([[1.0, -1, 0.5, 0], [0, 0.5, -1, 1]])  # 4 -> 2, no bias (timm)
    mlp_out = torch.tensor([[1.0, 0], [-1, 1], [0.5, 0.5], [0, -2]])  # 2 -> 4
    spatial = torch.randn(1, 2, 7, 7, generator=torch.Generator().manual_seed(1)) / 7
    with torch.no_grad():
        cbam.channel.fc1.weight.copy_(mlp_in.view(2, 4, 1, 1))
        cbam.channel.fc2.weight.copy_(mlp_out.view(4, 2, 1, 1))
        cbam.spatial.conv.conv.weight.copy_(spatial)
    assert cbam.channel.fc1.bias is None and cbam.spatial.conv.conv.bias is None
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))

    def mlp(v):  # [2, 4] -> [2, 4]
        return torch.relu(v @ mlp_in.T) @ mlp_out.T

    channel_gate = torch.sigmoid(mlp(x.mean((2, 3))) + mlp(x.amax((2, 3))))
    y = x * channel_gate[:, :, None, None]
    pooled = torch.cat([y.mean(1, keepdim=True), y.amax(1, keepdim=True)], dim=1)
    logits = F.conv2d(pooled, spatial, padding=3)  # [2, 1, 6, 6]
    # bn: timm's BatchNorm in eval, at its initial running statistics (0, 1); gn: no norm in
    # the spatial gate (the paper's equation), so no BatchNorm anywhere in a gn model
    normed = logits / torch.sqrt(torch.tensor(1.0 + 1e-5)) if norm == "bn" else logits
    expected = y * torch.sigmoid(normed)
    assert cbam.channel.fc1.out_channels == 2
    assert torch.allclose(cbam(x), expected, atol=1e-6)


def test_eca_is_a_1d_convolution_across_the_channel_means():
    eca = EcaModule(4)
    assert eca.conv.kernel_size == (3,) and eca.conv.bias is None  # adaptive kernel at 4 ch
    with torch.no_grad():
        eca.conv.weight.copy_(torch.tensor([[[0.5, 1.0, -0.5]]]))
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    m = F.pad(x.mean((2, 3)), (1, 1))  # [2, 6]: zero padding at both ends of the channels
    conv = 0.5 * m[:, :-2] + 1.0 * m[:, 1:-1] - 0.5 * m[:, 2:]
    assert torch.allclose(eca(x), x * torch.sigmoid(conv)[:, :, None, None], atol=1e-6)


def test_eca_kernel_adapts_to_the_channels():
    assert [EcaModule(c).conv.kernel_size[0] for c in (64, 128, 1024, 2048)] == [3, 5, 5, 7]


# --- counts against timm --------------------------------------------------------------------


# Counted on the meta device: shapes without memory or initialisation, so width 64 is quick.


def _ours(name, **kw):
    with torch.device("meta"):
        return count_parameters(create_model(ModelConfig(name=name, norm="bn", **kw)))


def _timms(name, **kw):
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=2, in_chans=1, **kw)
    return count_parameters(model)


@pytest.mark.parametrize(
    ("ours", "attention", "theirs", "block_args"),
    [
        ("se_resnet50", "auto", "seresnet50", None),  # C/16 is a multiple of 8 from 256 up
        ("resnet50", "cbam", "resnet50", {"attn_layer": "cbam"}),  # CbamModule: rd_divisor 1
        ("resnet50", "eca", "resnet50", {"attn_layer": "eca"}),
        ("resnet50", "auto", "resnet50", None),
        ("resnet34", "auto", "resnet34", None),
    ],
)
def test_parameter_counts_equal_timms(ours, attention, theirs, block_args):
    kw = {"block_args": block_args} if block_args else {}
    assert _ours(ours, attention=attention) == _timms(theirs, **kw)


def test_se_resnet34_squeezes_64_channels_to_4_where_timm_rounds_to_8():
    # timm's SEModule rounds C/16 = 4 up to 8 at 64 channels: fc1 and fc2 each lose 4 x 64
    # weights and fc1 4 biases, in each of layer1's 3 blocks.
    assert _timms("seresnet34") - _ours("se_resnet34") == 3 * 4 * (2 * 64 + 1) == 1548


def test_measured_counts_at_width_64():
    assert _ours("resnet50") == 23_505_858
    assert _ours("se_resnet50") == 26_036_850
    assert _ours("resnet50", attention="cbam") == 26_022_402
    # ResNet-50 + 3x3 conv (36_864) + its norm (128) + CBAM on 64 (612) + CBAM on 2048 (524_388)
    assert _ours("thesis_cbam_resnet50") == 23_505_858 + 36_864 + 128 + 612 + 524_388


# --- every member trains ----------------------------------------------------------------------


def _trains(model):
    images = torch.randn(2, 1, SIZE, SIZE)
    logits = model(images)
    assert logits.shape == (2, 2)
    logits.sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("norm", ["gn", "bn"])
@pytest.mark.parametrize("attention", ["none", "se", "cbam", "eca"])
@pytest.mark.parametrize("depth", [18, 34, 50])
def test_every_depth_attention_and_norm_trains(depth, attention, norm):
    cfg = ModelConfig(name=f"resnet{depth}", attention=attention, norm=norm, **TINY)
    model = create_model(cfg)
    found = {type(m) for m in _attention_modules(model)}
    expected = {"none": set(), "se": {SEModule}, "cbam": {CbamModule}, "eca": {EcaModule}}
    assert found == expected[attention]
    if attention != "none":
        assert all(block.se is not None for block in _blocks(model))
    if norm == "gn":  # CBAM's spatial gate too: no BatchNorm anywhere
        assert not any(
            isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()
        )
    _trains(model)


@pytest.mark.parametrize(
    ("name", "attention", "expected"),
    [
        ("se_resnet50", "auto", SEModule),
        ("se_resnet34", "none", None),
        ("se_resnet18", "cbam", CbamModule),
        ("resnet50", "auto", None),
        ("resnet18", "eca", EcaModule),
    ],
)
def test_auto_is_the_names_attention_and_an_explicit_one_overrides_it(name, attention, expected):
    model = create_model(ModelConfig(name=name, attention=attention, **TINY))
    kinds = {type(b.se) for b in _blocks(model)}
    assert kinds == ({expected} if expected else {type(None)})


def test_resnet50_width_scales_the_bottleneck_stages():
    model = create_model(ModelConfig(name="se_resnet50", **TINY))
    assert model.conv1.out_channels == 64
    assert [
        s[-1].conv3.out_channels for s in (model.layer1, model.layer2, model.layer3, model.layer4)
    ] == [64, 128, 256, 512]
    assert model.layer1[0].se.fc1.out_channels == 4  # 64 / 16
    assert model.fc.in_features == 512


# --- the thesis's CBAM-ResNet-50 --------------------------------------------------------------

THESIS_ORDER = [
    "conv1", "bn1", "act1", "maxpool", "pre_conv", "pre_norm", "pre_act", "pre_cbam",
    "layer1", "layer2", "layer3", "layer4", "post_cbam", "global_pool", "fc",
]  # fmt: skip


@pytest.mark.parametrize("norm", ["gn", "bn"])
def test_thesis_cbam_resnet50_has_cbam_after_the_stem_and_after_layer4(norm):
    model = create_model(ModelConfig(name="thesis_cbam_resnet50", norm=norm, **TINY), SIZE)
    keys = model.state_dict().keys()
    for prefix in ("pre_conv.", "pre_norm.", "pre_cbam.", "post_cbam."):
        assert any(k.startswith(prefix) for k in keys), prefix
    assert model.pre_conv.kernel_size == (3, 3) and model.pre_conv.stride == (1, 1)
    assert model.pre_conv.in_channels == model.pre_conv.out_channels == 64
    assert isinstance(model.pre_cbam, CbamModule) and isinstance(model.post_cbam, CbamModule)
    assert model.pre_cbam.channel.fc1.out_channels == 64 // 16
    assert model.post_cbam.channel.fc1.in_channels == 512  # layer4's 8 x 16 x 4 channels
    assert all(b.se is None for b in _blocks(model))  # auto: no attention in the blocks
    assert model.fc.out_features == 2 and model.layer4 is not None
    order = []
    for name in THESIS_ORDER:
        getattr(model, name).register_forward_hook(lambda *_, n=name: order.append(n))
    model.eval()
    x = torch.randn(1, 1, SIZE, SIZE)
    with torch.no_grad():
        logits = model(x)
        assert order == THESIS_ORDER  # every module once, in this order
        assert torch.equal(model.forward_head(model.forward_features(x)), logits)
    model.train()
    _trains(model)


def test_thesis_cbam_resnet50_takes_explicit_attention_in_its_blocks_and_other_heads():
    model = create_model(ModelConfig(name="thesis_cbam_resnet50", attention="se", **TINY))
    assert {type(b.se) for b in _blocks(model)} == {SEModule}
    three = create_model(
        ModelConfig(name="thesis_cbam_resnet50", head="thesis", **TINY), num_classes=3
    )
    assert three(torch.randn(2, 1, SIZE, SIZE)).shape == (2, 3)
    assert isinstance(three.post_cbam, CbamModule)


# --- today's se_resnet18 is unchanged ---------------------------------------------------------


def test_se_resnet18_default_state_dict_is_what_it_was():
    model = create_model(ModelConfig())
    state = model.state_dict()
    names_shapes = "\n".join(f"{n}:{tuple(t.shape)}" for n, t in state.items())
    # Measured once from the ResNet-18-only builder this family replaced.
    assert len(state) == 94
    assert sum(t.numel() for t in state.values()) == count_parameters(model) == 11_260_346
    assert hashlib.sha256(names_shapes.encode()).hexdigest()[:16] == "f807417b20823bc9"


# --- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (
            {"name": "resnet50", "attention": "se", "width": 16, "se_reduction": 3},
            r"model.se_reduction 3 must divide model.width 16",
        ),
        (
            {"name": "resnet34", "attention": "cbam", "width": 16, "se_reduction": 32},
            r"model.se_reduction 32 must divide model.width 16",
        ),
        (
            {"name": "thesis_cbam_resnet50", "norm": "bn", "width": 48, "se_reduction": 3},
            r"model.se_reduction 3 must divide model.width 48 and the stem's 64 channels",
        ),
        ({"name": "resnet50", "width": 16, "gn_groups": 32}, r"model.gn_groups 32 must divide"),
        ({"name": "se_resnet18", "attention": "sk"}, r"unknown model.attention 'sk'"),
    ],
)
def test_invalid_combinations_name_the_key(cfg, message):
    with pytest.raises(UserError, match=message):
        create_model(ModelConfig(**cfg))


def test_eca_has_no_reduction_so_se_reduction_does_not_constrain_it():
    model = create_model(ModelConfig(name="resnet18", attention="eca", width=16, se_reduction=3))
    assert _attention_modules(model)
