"""TensorFlow 1's learning-rate decays as factors: values against the published formulas,
hand-computed here, plus warm-up, LambdaLR, CosineAnnealingLR and the one-line errors."""

import math

import pytest
import torch

from pneumonia.core.errors import UserError
from pneumonia.training.schedules import (
    DECAY_NAMES,
    DECAYS,
    DecayConfig,
    check_decay,
    decay_factor,
    lambda_scheduler,
)

ORDER = [
    "constant",
    "piecewise",
    "polynomial",
    "exponential",
    "inverse_time",
    "natural_exp",
    "cosine",
    "linear_cosine",
    "noisy_linear_cosine",
]


def f(name, t, total=10, seed=0, **cfg):
    return decay_factor(name, t, total, DecayConfig(**cfg), seed)


def test_registry_order_and_names():
    assert list(DECAYS.names()) == ORDER and list(DECAY_NAMES) == ORDER


def test_constant_is_one():
    assert [f("constant", t) for t in (0, 3, 10, 50)] == [1.0] * 4


def test_piecewise_earlier_value_at_a_boundary():
    # total 20, boundaries [0.5, 0.75]: steps 10 and 15; x <= boundary keeps the earlier value.
    got = {t: f("piecewise", t, total=20) for t in (0, 9, 10, 11, 15, 16, 40)}
    assert got == {0: 1.0, 9: 1.0, 10: 1.0, 11: 0.1, 15: 0.1, 16: 0.01, 40: 0.01}


def test_piecewise_boundary_free_of_float_noise():
    # 0.29 * 100 = 28.999999999999996: step 29 still sits on the boundary.
    cfg = dict(boundaries=[0.29], factors=[1.0, 0.5])
    assert f("piecewise", 29, total=100, **cfg) == 1.0
    assert f("piecewise", 30, total=100, **cfg) == 0.5


def test_polynomial():
    assert f("polynomial", 0, power=2.0) == 1.0
    assert f("polynomial", 5, power=2.0) == pytest.approx(0.25)  # (1 - 5/10)^2
    assert f("polynomial", 3) == pytest.approx(0.7)
    # (1 - 0.1) * (1 - 3/10)^2 + 0.1 = 0.9 * 0.49 + 0.1
    assert f("polynomial", 3, power=2.0, end_factor=0.1) == pytest.approx(0.541)
    # Held at end after T: min(t, T).
    assert f("polynomial", 10, end_factor=0.1) == pytest.approx(0.1)
    assert f("polynomial", 25, end_factor=0.1) == pytest.approx(0.1)
    # decay_steps overrides the length: T = 4 of a 10-unit run.
    assert f("polynomial", 2, decay_steps=4) == pytest.approx(0.5)
    assert f("polynomial", 7, decay_steps=4) == 0.0


def test_exponential():
    assert f("exponential", 0) == 1.0
    assert f("exponential", 5) == pytest.approx(0.31622776601683794)  # 0.1^(5/10)
    assert f("exponential", 10) == pytest.approx(0.1)
    assert f("exponential", 20) == pytest.approx(0.01)  # not clamped at T
    assert f("exponential", 3, decay_rate=0.5) == pytest.approx(0.5**0.3)
    # Staircase: floor(t / T) with T = 4: 7 -> 1, 8 -> 2.
    assert f("exponential", 7, decay_steps=4, decay_rate=0.5, staircase=True) == 0.5
    assert f("exponential", 8, decay_steps=4, decay_rate=0.5, staircase=True) == 0.25
    assert f("exponential", 3, decay_steps=4, staircase=True) == 1.0


def test_inverse_time():
    assert f("inverse_time", 0) == 1.0
    assert f("inverse_time", 3) == pytest.approx(1 / 1.03)
    assert f("inverse_time", 10, decay_rate=9.0) == pytest.approx(0.1)
    assert f("inverse_time", 30, decay_rate=0.5) == pytest.approx(1 / 2.5)  # not clamped
    # Staircase: 1 / (1 + 0.5 * floor(7 / 4)) = 1 / 1.5.
    assert f("inverse_time", 7, decay_steps=4, decay_rate=0.5, staircase=True) == pytest.approx(
        1 / 1.5
    )


def test_natural_exp():
    assert f("natural_exp", 0) == 1.0
    assert f("natural_exp", 3) == pytest.approx(math.exp(-0.03))
    assert f("natural_exp", 10, decay_rate=2.3) == pytest.approx(0.10025884372280375)
    assert f("natural_exp", 20, decay_rate=2.3) == pytest.approx(math.exp(-4.6))
    assert f("natural_exp", 9, decay_steps=4, decay_rate=1.0, staircase=True) == pytest.approx(
        math.exp(-2)
    )


def test_cosine():
    assert f("cosine", 0) == 1.0
    assert f("cosine", 5) == pytest.approx(0.5)
    assert f("cosine", 3) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.3)))  # 0.7938926
    assert f("cosine", 3) == pytest.approx(0.7938926261462366)
    assert f("cosine", 10) == pytest.approx(0.0, abs=1e-15)
    assert f("cosine", 17, alpha=0.2) == pytest.approx(0.2)  # held at alpha past T
    assert f("cosine", 5, alpha=0.2) == pytest.approx(0.8 * 0.5 + 0.2)


def test_cosine_is_the_round_schedule_bit_for_bit():
    for total in (1, 3, 7, 30):
        for t in range(total + 1):
            assert f("cosine", t, total=total) == 0.5 * (1 + math.cos(math.pi * t / total))


def test_linear_cosine():
    # TF defaults: alpha 0, beta 0.001, num_periods 0.5.
    assert f("linear_cosine", 0) == pytest.approx(1.001)
    # t = 5: linear 0.5, cosine 0.5 -> 0.25 + 0.001.
    assert f("linear_cosine", 5) == pytest.approx(0.251)
    # t = 3: linear 0.7, cosine 0.5 * (1 + cos(0.3 pi)) = 0.79389...
    assert f("linear_cosine", 3) == pytest.approx(0.7 * 0.7938926261462366 + 0.001)
    assert f("linear_cosine", 10) == pytest.approx(0.001)
    assert f("linear_cosine", 40) == pytest.approx(0.001)
    # num_periods 1, alpha 0.5, beta 0: t = 5: (0.5 + 0.5) * 0.5 * (1 + cos(pi)) = 0.
    assert f("linear_cosine", 5, num_periods=1.0, alpha=0.5, beta=0.0) == pytest.approx(0.0)
    # t = 10: (0.5 + 0) * 0.5 * (1 + cos(2 pi)) = 0.5.
    assert f("linear_cosine", 10, num_periods=1.0, alpha=0.5, beta=0.0) == pytest.approx(0.5)


def test_noisy_linear_cosine_reproducible_and_varied():
    a = [f("noisy_linear_cosine", t, seed=7) for t in range(6)]
    assert a == [f("noisy_linear_cosine", t, seed=7) for t in range(6)]
    assert a != [f("noisy_linear_cosine", t, seed=8) for t in range(6)]
    plain = [f("linear_cosine", t) for t in range(6)]
    noise = [x - p for x, p in zip(a, plain, strict=True)]
    assert len(set(noise)) == 6 and all(n != 0 for n in noise)


def test_noisy_linear_cosine_without_variance_is_linear_cosine():
    for t in (0, 3, 10, 15):
        assert f("noisy_linear_cosine", t, initial_variance=0.0, seed=3) == f("linear_cosine", t)


def test_noisy_linear_cosine_noise_scale():
    # eps_t = sqrt(v0 / (1 + t)^vd) * N(0, 1): at t = 3, cosine factor 0.79389, variance
    # 16 / 4^1 = 4, so std 2 (not 4: the variance is no std); the standard normal from the seed.
    t, seed = 3, 5
    normal = torch.randn(
        (), generator=torch.Generator().manual_seed(seed * 1_000_003 + t), dtype=torch.float64
    ).item()
    got = f("noisy_linear_cosine", t, seed=seed, initial_variance=16.0, variance_decay=1.0)
    cos = 0.7938926261462366
    assert got == pytest.approx((0.7 + 2.0 * normal) * cos + 0.001)
    # Past T TF clamps the step before the variance too: (1 + min(t, T)) = 11.
    t = 14
    normal = torch.randn(
        (), generator=torch.Generator().manual_seed(seed * 1_000_003 + t), dtype=torch.float64
    ).item()
    got = f("noisy_linear_cosine", t, seed=seed, initial_variance=4.0, variance_decay=1.0, beta=0.0)
    assert got == pytest.approx(0.0, abs=1e-12)  # cosine factor 0 at T with num_periods 0.5
    got = f("noisy_linear_cosine", t, seed=seed, initial_variance=44.0, variance_decay=1.0,
            num_periods=1.0, beta=0.0)  # fmt: skip
    assert got == pytest.approx(2.0 * normal)  # (0 + 0 + sqrt(44 / 11) * normal) * 1 + 0


def test_warmup_multiplies_every_decay():
    # (t + 1) / (w + 1) for t < w, then the decay alone.
    assert [f("constant", t, warmup=3) for t in range(5)] == pytest.approx(
        [0.25, 0.5, 0.75, 1.0, 1.0]
    )
    assert f("exponential", 1, warmup=4) == pytest.approx(0.1**0.1 * 2 / 5)
    assert f("cosine", 2, warmup=4) == pytest.approx(0.5 * (1 + math.cos(0.2 * math.pi)) * 3 / 5)
    assert f("piecewise", 2, warmup=2) == 1.0
    for name in ORDER:
        assert f(name, 0, warmup=1, initial_variance=0.0) == pytest.approx(
            0.5 * f(name, 0, initial_variance=0.0)
        )


def _lrs(scheduler, optimizer, steps):
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_lambda_scheduler_drives_sgd_through_the_factors():
    cfg = DecayConfig(warmup=2, decay_rate=0.5)
    for name in ("exponential", "piecewise", "noisy_linear_cosine"):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)
        scheduler = lambda_scheduler(optimizer, name, 8, cfg, seed=4)
        expected = [0.2 * decay_factor(name, t, 8, cfg, seed=4) for t in range(12)]
        assert _lrs(scheduler, optimizer, 12) == pytest.approx(expected)
    # Hand values: exponential 0.5^(t/8) with warm-up thirds at t = 0, 1.
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)
    lrs = _lrs(lambda_scheduler(optimizer, "exponential", 8, cfg), optimizer, 5)
    assert lrs == pytest.approx([0.2 / 3, 0.2 * 0.5**0.125 * 2 / 3, 0.2 * 0.5**0.25,
                                 0.2 * 0.5**0.375, 0.2 * 0.5**0.5])  # fmt: skip


def test_lambda_scheduler_state_holds_no_closure():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = lambda_scheduler(optimizer, "cosine", 5, DecayConfig())
    assert scheduler.state_dict()["lr_lambdas"] == [None]


def test_cosine_equals_cosine_annealing_lr():
    total = 12
    opt_a = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3)
    opt_b = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3)
    ours = lambda_scheduler(opt_a, "cosine", total, DecayConfig())
    torchs = torch.optim.lr_scheduler.CosineAnnealingLR(opt_b, T_max=total, eta_min=0)
    a, b = _lrs(ours, opt_a, total + 1), _lrs(torchs, opt_b, total + 1)
    assert a == pytest.approx(b, rel=1e-12, abs=1e-15)


def test_unknown_name_one_line_with_key_and_every_choice():
    with pytest.raises(UserError) as err:
        decay_factor("step", 0, 10, DecayConfig())
    text = str(err.value)
    assert "\n" not in text and text.startswith("unknown optim.scheduler 'step': choose one of ")
    assert all(name in text for name in ORDER)
    with pytest.raises(UserError, match="^unknown federated.round_lr 'linear'"):
        decay_factor("linear", 0, 10, DecayConfig(), key="federated.round_lr")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(UserError, match="federated.round_lr"):
        lambda_scheduler(optimizer, "nope", 10, DecayConfig(), key="federated.round_lr")


@pytest.mark.parametrize(
    "boundaries, factors, key",
    [
        ([0.75, 0.5], [1.0, 0.1, 0.01], "optim.decay.boundaries"),
        ([0.5, 0.5], [1.0, 0.1, 0.01], "optim.decay.boundaries"),
        ([0.0, 0.5], [1.0, 0.1, 0.01], "optim.decay.boundaries"),
        ([0.5, 1.0], [1.0, 0.1, 0.01], "optim.decay.boundaries"),
        ([0.5, 0.75], [1.0, 0.1], "optim.decay.factors"),
        ([0.5], [1.0, 0.1, 0.01], "optim.decay.factors"),
        ([0.5], [1.0, -0.1], "optim.decay.factors"),
    ],
)
def test_bad_boundaries_or_factors_refused(boundaries, factors, key):
    cfg = DecayConfig(boundaries=boundaries, factors=factors)
    with pytest.raises(UserError) as err:
        check_decay(cfg)
    assert str(err.value).startswith(key) and "\n" not in str(err.value)
    with pytest.raises(UserError, match=key):
        decay_factor("piecewise", 0, 10, cfg)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(UserError, match=key):
        lambda_scheduler(optimizer, "piecewise", 10, cfg)


def test_defaults_pass_the_check():
    check_decay(DecayConfig())
    check_decay(DecayConfig(boundaries=[], factors=[0.3]))
