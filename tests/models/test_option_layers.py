"""Optional layers (pneumonia.models.layers): every activation against hand-computed values,
Batch Renormalization against BatchNorm and its own formula, DropConnect against its mask."""

import math

import pytest
import torch
from torch import nn

from pneumonia.core.errors import UserError
from pneumonia.models.layers import (
    ACTIVATIONS,
    BatchRenorm2d,
    DropConnectLinear,
    Maxout,
    NoisySoftplus,
    activation_layer,
)

NAMES = ["relu", "sigmoid", "tanh", "prelu", "rrelu", "elu", "softplus", "noisy_softplus", "maxout"]
XS = [-2.0, -0.5, 0.0, 1.0, 3.0]
RRELU_EVAL_SLOPE = (1 / 8 + 1 / 3) / 2


def _noisy(v, k, sigma):
    return k * sigma * math.log(1 + math.exp(v / (k * sigma)))


EXPECTED = {
    "relu": lambda v: max(v, 0.0),
    "sigmoid": lambda v: 1 / (1 + math.exp(-v)),
    "tanh": math.tanh,
    "prelu": lambda v: v if v > 0 else 0.25 * v,
    "rrelu": lambda v: v if v > 0 else RRELU_EVAL_SLOPE * v,
    "elu": lambda v: v if v > 0 else math.exp(v) - 1,
    "softplus": lambda v: math.log(1 + math.exp(v)),
    "noisy_softplus": lambda v: _noisy(v, 0.5, 1.0),  # the defaults
}


def test_registry_names_in_order():
    assert list(ACTIVATIONS.names()) == NAMES


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_elementwise_activation_values(name):
    layer = activation_layer(name)(inplace=False).eval()  # eval: RReLU's mean slope
    got = layer(torch.tensor(XS))
    want = torch.tensor([EXPECTED[name](v) for v in XS])
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("k,sigma", [(0.5, 2.0), (0.2, 1.0), (1.0, 0.3)])
def test_noisy_softplus_values(k, sigma):
    layer = activation_layer("noisy_softplus", noisy_softplus_k=k, noisy_softplus_sigma=sigma)()
    got = layer(torch.tensor(XS, dtype=torch.float64))
    want = torch.tensor([_noisy(v, k, sigma) for v in XS], dtype=torch.float64)
    torch.testing.assert_close(got, want)
    if k * sigma == 1.0:  # the plain softplus
        torch.testing.assert_close(got, nn.functional.softplus(torch.tensor(XS).double()))


@pytest.mark.parametrize(
    "channels,pieces,want",
    [
        # out[c] = max over j < pieces of x[(c + j) mod C]: the last channels wrap around.
        ([4.0, 1.0, 2.0], 2, [4.0, 2.0, 4.0]),
        ([4.0, 1.0, 2.0], 3, [4.0, 4.0, 4.0]),
        ([4.0, 1.0, 2.0, 0.0], 3, [4.0, 2.0, 4.0, 4.0]),
    ],
)
def test_maxout_values(channels, pieces, want):
    layer = activation_layer("maxout", maxout_pieces=pieces)(inplace=True)
    x = torch.tensor(channels).reshape(1, -1, 1, 1)
    x_before = x.clone()
    assert layer(x).flatten().tolist() == want
    assert torch.equal(x, x_before)  # not in-place, whatever timm asks
    assert layer(x.reshape(1, -1)).tolist() == [want]  # [B, C] too
    assert not list(layer.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_factories_take_inplace_and_build_fresh_modules(name):
    factory = activation_layer(name)
    a, b = factory(inplace=True), factory(inplace=True)
    assert isinstance(a, nn.Module) and isinstance(b, nn.Module)
    assert a is not b
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert pa is not pb


def test_prelu_slopes_belong_to_each_layer():
    factory = activation_layer("prelu")
    a, b = factory(inplace=True), factory(inplace=True)
    assert a.weight.numel() == 1 and a.weight.item() == pytest.approx(0.25)
    with torch.no_grad():
        a.weight.fill_(0.5)
    assert b.weight.item() == pytest.approx(0.25)


def test_relu_honours_inplace():
    factory = activation_layer("relu")
    x = torch.tensor(XS)
    factory(inplace=False)(x)
    assert x.tolist() == XS
    factory(inplace=True)(x)
    assert x.tolist() == [max(v, 0.0) for v in XS]


def test_unknown_activation_is_one_line_naming_key_and_choices():
    with pytest.raises(UserError) as err:
        activation_layer("swish")
    message = str(err.value)
    assert "\n" not in message
    assert "model.activation" in message and "'swish'" in message
    assert all(name in message for name in NAMES)


@pytest.mark.parametrize(
    "build,key",
    [
        (lambda: activation_layer("maxout", maxout_pieces=1), "model.maxout_pieces"),
        (lambda: Maxout(0), "model.maxout_pieces"),
        (lambda: NoisySoftplus(k=0.0), "model.noisy_softplus_k"),
        (lambda: NoisySoftplus(sigma=-1.0), "model.noisy_softplus_sigma"),
        (lambda: BatchRenorm2d(4, r_max=0.5), "model.brn_r_max"),
        (lambda: BatchRenorm2d(4, d_max=-1.0), "model.brn_d_max"),
        (lambda: DropConnectLinear(3, 2, p=1.0), "model.drop_connect"),
        (lambda: DropConnectLinear(3, 2, p=-0.1), "model.drop_connect"),
    ],
)
def test_bad_options_name_their_key(build, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")) as err:
        build()
    assert "\n" not in str(err.value)


# --- Batch Renormalization ---------------------------------------------------------------


def _batch(seed, shape=(4, 8, 5, 5)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 2.0 + 3.0  # far from zero mean, unit variance


def _same_affine(brn, bn, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in (brn, bn):
            layer.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            layer.bias.copy_(torch.randn(bn.num_features, generator=g))
            g.manual_seed(seed)


def test_batch_renorm_at_r1_d0_is_batchnorm():
    brn, bn = BatchRenorm2d(8, r_max=1.0, d_max=0.0), nn.BatchNorm2d(8)
    _same_affine(brn, bn)
    for step in range(3):
        x = _batch(step)
        upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + step))
        results = []
        for layer in (brn, bn):
            layer.zero_grad()
            xi = x.clone().requires_grad_()
            y = layer(xi)
            (y * upstream).sum().backward()  # a loss that weighs every output differently
            results.append((y, xi.grad, layer.weight.grad, layer.bias.grad))
        for got, want in zip(*results, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(brn.running_mean, bn.running_mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(brn.running_var, bn.running_var, atol=1e-5, rtol=0)
        assert brn.num_batches_tracked.item() == bn.num_batches_tracked.item() == step + 1
    brn.eval(), bn.eval()
    x = _batch(9)
    torch.testing.assert_close(brn(x), bn(x), atol=1e-5, rtol=1e-5)


def _far_running_stats(layer, mean=1.0, var=4.0):
    with torch.no_grad():
        layer.running_mean.fill_(mean)
        layer.running_var.fill_(var)


def test_batch_renorm_differs_from_batchnorm_and_follows_its_formula():
    brn, bn = BatchRenorm2d(8, r_max=3.0, d_max=5.0), nn.BatchNorm2d(8)
    _same_affine(brn, bn)
    _far_running_stats(brn, mean=1.0, var=16.0)  # the batches have mean 3, variance 4
    x = _batch(1).requires_grad_()
    y = brn(x)
    assert not torch.allclose(y, bn(x), atol=1e-3)
    # Channel 0 by hand: batch statistics, then r and d against running mean 1, variance 16.
    c0 = x[:, 0].detach().double().requires_grad_()
    mu_b = c0.mean()
    sigma_b = torch.sqrt(c0.var(unbiased=False) + 1e-5)
    sigma = math.sqrt(16.0 + 1e-5)
    r = min(max(sigma_b.item() / sigma, 1 / 3), 3.0)
    d = min(max((mu_b.item() - 1.0) / sigma, -5.0), 5.0)
    assert 0.3 < d < 5.0 and 1 / 3 < r < 0.8  # both unclipped but far from BN's r 1, d 0
    want = brn.weight[0].item() * ((c0 - mu_b) / sigma_b * r + d) + brn.bias[0].item()
    torch.testing.assert_close(y[:, 0].double(), want, atol=1e-5, rtol=1e-5)
    # r and d are constants to the gradient (the paper's stop-gradient): floats above.
    y[:, 0].sum().backward()
    want.sum().backward()
    torch.testing.assert_close(x.grad[:, 0].double(), c0.grad, atol=1e-5, rtol=1e-5)


# Two images of 1x1 pixels, per channel, against running mean 1 and variance 4 (sigma ~2):
#   channel 0: [10, 30], mean 20, sigma_B 10 -> r 5 clipped to r_max, d 9.5 clipped to d_max
#   channel 1: [1.5, 2.5], mean 2, sigma_B 0.5 -> r 0.25 clipped to 1/r_max, d 0.5
CLIP_BATCH = torch.tensor([[10.0, 1.5], [30.0, 2.5]]).reshape(2, 2, 1, 1)


def _clip_output(r_max, d_max, eps=1e-5):
    """Hand-computed output on CLIP_BATCH for weight 1 and bias 0 at these limits."""
    sigma = math.sqrt(4.0 + eps)
    columns = []
    for half_range, mean in ((10.0, 20.0), (0.5, 2.0)):
        sigma_b = math.sqrt(half_range**2 + eps)
        r = min(max(sigma_b / sigma, 1 / r_max), r_max)
        d = min(max((mean - 1.0) / sigma, -d_max), d_max)
        columns.append([v * half_range / sigma_b * r + d for v in (-1.0, 1.0)])
    return torch.tensor(columns).T.reshape(2, 2, 1, 1)


def test_batch_renorm_clips_r_and_d():
    brn = BatchRenorm2d(2, r_max=3.0, d_max=5.0)
    _far_running_stats(brn)
    y = brn(CLIP_BATCH)
    torch.testing.assert_close(y, _clip_output(3.0, 5.0), atol=1e-4, rtol=0)
    assert not torch.allclose(y, _clip_output(100.0, 100.0), atol=0.1)  # the clip is active
    # Channel 0: +-1 * r_max 3 + d_max 5; channel 1: +-1 / r_max + d 0.5.
    assert y[:, 0].flatten().tolist() == pytest.approx([2.0, 8.0], abs=1e-4)
    assert y[:, 1].flatten().tolist() == pytest.approx([0.5 - 1 / 3, 0.5 + 1 / 3], abs=1e-4)


def test_batch_renorm_warmup_starts_as_batchnorm_and_relaxes():
    brn = BatchRenorm2d(2, r_max=3.0, d_max=5.0, warmup_steps=10)
    assert brn.limits() == (1.0, 0.0)
    _far_running_stats(brn)
    bn = nn.BatchNorm2d(2)
    torch.testing.assert_close(brn(CLIP_BATCH), bn(CLIP_BATCH), atol=1e-5, rtol=0)
    assert brn.num_batches_tracked.item() == 1
    with torch.no_grad():
        brn.num_batches_tracked.fill_(5)
    _far_running_stats(brn)
    assert brn.limits() == pytest.approx((2.0, 2.5))
    torch.testing.assert_close(brn(CLIP_BATCH), _clip_output(2.0, 2.5), atol=1e-4, rtol=0)
    with torch.no_grad():
        brn.num_batches_tracked.fill_(25)
    assert brn.limits() == (3.0, 5.0)
    assert BatchRenorm2d(2, r_max=3.0, d_max=5.0).limits() == (3.0, 5.0)  # no warm-up


def test_batch_renorm_eval_uses_running_statistics():
    brn = BatchRenorm2d(2).eval()
    _far_running_stats(brn, mean=1.0, var=1e-4)  # so small that eps shows
    want = (CLIP_BATCH - 1.0) / math.sqrt(1e-4 + 1e-5)
    torch.testing.assert_close(brn(CLIP_BATCH), want)
    assert brn.num_batches_tracked.item() == 0


def test_state_dicts_match_torch_layers():
    brn, bn = BatchRenorm2d(6).state_dict(), nn.BatchNorm2d(6).state_dict()
    assert list(brn) == list(bn)
    assert all(brn[k].shape == bn[k].shape and brn[k].dtype == bn[k].dtype for k in bn)
    # What FedBN and the privacy check look for to find normalisation layers.
    assert isinstance(BatchRenorm2d(6), nn.modules.batchnorm._BatchNorm)
    assert list(DropConnectLinear(5, 3).state_dict()) == list(nn.Linear(5, 3).state_dict())


# --- DropConnect -------------------------------------------------------------------------


def _linear_pair(p):
    torch.manual_seed(0)
    linear = nn.Linear(16, 12)
    return linear, DropConnectLinear.from_linear(linear, p)


def test_drop_connect_eval_and_p0_are_the_linear():
    linear, layer = _linear_pair(0.5)
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer.eval()(x), linear(x))
    linear, layer = _linear_pair(0.0)
    torch.testing.assert_close(layer.train()(x), linear(x))


def test_drop_connect_training_drops_weights_with_one_mask_per_forward():
    p = 0.5
    linear, layer = _linear_pair(p)
    layer.train()
    eye = torch.eye(16)
    batch = torch.cat([eye, eye])  # each weight column twice in one batch
    torch.manual_seed(7)
    out = layer(batch)
    torch.manual_seed(7)
    keep = (torch.rand_like(linear.weight) >= p).float()
    want_weight = linear.weight * keep / (1 - p)
    torch.testing.assert_close(out[:16], eye @ want_weight.T + linear.bias)
    torch.testing.assert_close(out[16:], out[:16])  # the mask is shared by the batch
    # Every weight is either dropped or doubled, about half of each; the bias is untouched.
    effective = (out[:16] - linear.bias).T
    dropped = effective.abs() < 1e-7
    torch.testing.assert_close(effective[~dropped], 2 * linear.weight[~dropped])
    assert 0.3 < dropped.float().mean().item() < 0.7
    # A new forward draws a new mask.
    assert not torch.equal(layer(eye), out[:16])


def test_timm_resnet_builds_and_trains_with_these_layers():
    from timm.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    # timm passes device= and dtype= to the norm layer and calls act_layer(inplace=True).
    model = ResNet(
        block=BasicBlock,
        layers=(1, 1, 1, 1),
        channels=(4, 8, 8, 8),
        in_chans=1,
        num_classes=2,
        norm_layer=BatchRenorm2d,
        act_layer=activation_layer("prelu"),
    )
    model.fc = DropConnectLinear.from_linear(model.fc, 0.5)
    model(torch.randn(2, 1, 16, 16)).sum().backward()
    prelus = [m for m in model.modules() if isinstance(m, nn.PReLU)]
    assert len({id(m.weight) for m in prelus}) == len(prelus) > 1
    assert all(m.weight.grad is not None for m in prelus)
