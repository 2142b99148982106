"""MixStyle (pneumonia.models.mixstyle): the statistics it mixes against hand-computed ones,
seeded, only in training, no weights of its own, refused where it cannot apply; and a tiny fit
with both domain-generalisation options (MixStyle and RandConv) end to end."""

import copy
import json

import pytest
import torch

from pneumonia import fit
from pneumonia.core.errors import UserError
from pneumonia.data import transforms
from pneumonia.models import mixstyle as mixing
from pneumonia.models.factory import ModelConfig, create_model
from pneumonia.models.mixstyle import EPS, MixStyle, attach_mixstyle, mixstyle


def features(seed: int = 0, b: int = 4, c: int = 3, side: int = 5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, side, side, generator=gen) * 2 + torch.randn(b, c, 1, 1, generator=gen)


def stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(dim=(2, 3)), (x.var(dim=(2, 3)) + EPS).sqrt()


def test_lambda_one_or_the_identity_permutation_returns_the_input():
    x = features()
    ones, identity = torch.ones(4), torch.arange(4)
    torch.testing.assert_close(mixstyle(x, 0.1, perm=torch.tensor([2, 0, 3, 1]), lam=ones), x)
    torch.testing.assert_close(mixstyle(x, 0.1, perm=identity, lam=torch.rand(4)), x)


def test_mixed_statistics_are_the_hand_computed_mixture():
    x = features()
    perm, lam = torch.tensor([1, 0, 3, 2]), torch.tensor([0.0, 0.3, 0.5, 0.9])
    mu, sigma = stats(x)
    got_mu, got_sigma = stats(mixstyle(x, 0.1, perm=perm, lam=lam))
    want_mu = lam.view(4, 1) * mu + (1 - lam.view(4, 1)) * mu[perm]
    want_sigma = lam.view(4, 1) * sigma + (1 - lam.view(4, 1)) * sigma[perm]
    torch.testing.assert_close(got_mu, want_mu)
    torch.testing.assert_close(got_sigma, want_sigma, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_mu[0], mu[1])  # lam 0: the other instance's style


def test_the_module_at_p_one_mixes_by_its_own_draws():
    """p = 1: the output's channel means are the mixture of the means of each instance and
    the instance of the permutation drawn, by the Beta(alpha, alpha) weights drawn."""
    x = features(b=6)
    torch.manual_seed(11)
    got = MixStyle(p=1.0, alpha=0.1).train()(x)
    torch.manual_seed(11)
    torch.rand(())  # the module's draw of whether to mix this batch
    perm = torch.randperm(6)
    lam = torch.distributions.Beta(0.1, 0.1).sample((6,)).view(6, 1)
    mu = x.mean(dim=(2, 3))
    torch.testing.assert_close(got.mean(dim=(2, 3)), lam * mu + (1 - lam) * mu[perm])
    assert not torch.allclose(got, x)


def test_seeded_same_seed_same_output_other_seed_other_output():
    x = features(b=8)
    outs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        outs.append(MixStyle(p=1.0).train()(x))
    assert torch.equal(outs[0], outs[1])
    assert not torch.allclose(outs[0], outs[2])


def test_off_in_eval_and_at_p_zero():
    x = features()
    assert MixStyle(p=1.0).eval()(x) is x
    assert MixStyle(p=0.0).train()(x) is x


def test_keeps_shape_and_dtype_and_passes_gradients():
    x = features().bfloat16().requires_grad_()
    torch.manual_seed(0)
    out = MixStyle(p=1.0).train()(x)
    assert out.shape == x.shape and out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()


def tiny(mixstyle: float) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(name="resnet18", norm="gn", width=16, mixstyle=mixstyle)
    return create_model(cfg, image_size=32)


def test_the_state_dict_is_the_same_with_or_without_mixstyle():
    plain, mixed = tiny(0.0).state_dict(), tiny(1.0).state_dict()
    assert list(plain) == list(mixed)
    assert all(torch.equal(plain[k], mixed[k]) for k in plain)


def test_eval_output_is_the_same_with_or_without_mixstyle_training_output_is_not():
    plain, mixed = tiny(0.0), tiny(1.0)
    mixed.load_state_dict(plain.state_dict())
    images = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(plain.eval()(images), mixed.eval()(images))
        torch.manual_seed(0)
        trained_plain = plain.train()(images)
        torch.manual_seed(0)
        assert not torch.allclose(trained_plain, mixed.train()(images))
        # a copy (as a federated client may make) keeps its hooks
        torch.manual_seed(0)
        assert not torch.allclose(trained_plain, copy.deepcopy(mixed).train()(images))


def test_hooks_sit_after_layer1_and_layer2_only():
    model = tiny(1.0)
    hooked = [name for name, m in model.named_modules() if m._forward_hooks]
    assert hooked == ["layer1", "layer2"]


def test_a_model_without_residual_stages_is_refused_in_one_line():
    with pytest.raises(UserError, match="model.mixstyle") as err:
        attach_mixstyle(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3)), 0.5)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="model.mixstyle"):
        create_model(ModelConfig(name="alexnet", mixstyle=0.5))


def test_dp_sgd_refuses_mixstyle_before_training(tmp_path, capsys):
    runs = tmp_path / "runs"
    argv = ["--data.image_size", "32", "--model.width", "16", "--runs_root", str(runs)]
    private = ["--privacy.enabled", "true", "--privacy.noise_multiplier", "1"]
    private += ["--data.balance", "none"]
    with pytest.raises(SystemExit) as exit_info:
        fit.main([*argv, *private, "--federated.enabled", "false", "--model.mixstyle", "0.5"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: privacy") and "model.mixstyle" in err[-1]
    assert not any(runs.rglob("*.ckpt"))


def test_a_tiny_fit_with_mixstyle_and_randconv_writes_its_summary(tmp_path, monkeypatch):
    calls = {"mixstyle": 0, "randconv": 0}

    def counted(name, real):
        def call(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(mixing, "mixstyle", counted("mixstyle", mixing.mixstyle))
    monkeypatch.setattr(
        transforms, "random_convolution", counted("randconv", transforms.random_convolution)
    )
    run_dir = tmp_path / "run"
    argv = [
        "--federated.enabled", "false",
        "--data.image_size", "32",
        "--data.synthetic.n_patients", "20",
        "--data.batch_size", "16",
        "--model.name", "resnet18",
        "--model.width", "16",
        "--trainer.max_epochs", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--data.augment.enabled", "true",  # configs/default.yaml turns it off
        "--data.augment.randconv", "0.5",
        "--model.mixstyle", "0.5",
        "--run_dir", str(run_dir),
    ]  # fmt: skip
    summary = fit.main(argv)
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["epochs"] == 1 and on_disk["val"]["n"] == summary["val"]["n"] > 0
    assert calls["mixstyle"] > 0 and calls["randconv"] > 0  # both ran in training
