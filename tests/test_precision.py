"""trainer.precision bf16-mixed on a CPU: Lightning's bf16 autocast where the CPU computes bf16
natively, 32-true with one printed line where it does not; the default stays 32-true."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
import yaml

from pneumonia import fit
from pneumonia.federated import client as client_module
from pneumonia.run import centralized, config

TINY = [
    "--data.image_size", "32",
    "--data.synthetic.n_patients", "40",
    "--data.batch_size", "16",
    "--model.name", "se_resnet18",
    "--model.width", "16",
    "--trainer.precision", "bf16-mixed",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]  # fmt: skip
CENTRAL = ["--federated.enabled", "false", "--trainer.max_epochs", "1"]
FEDERATED = ["--federated.enabled", "true", "--federated.clients", "2"]
FEDERATED += ["--federated.rounds", "1", "--federated.local_epochs", "1"]


@pytest.fixture
def cpu(monkeypatch):
    """A machine without CUDA or MPS, and a process that has printed no fallback line yet;
    `cpu(native)` says whether its CPU computes bf16 natively."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    config.say_once.cache_clear()

    def set_native(native: bool) -> None:
        monkeypatch.setattr(config, "native_cpu_bf16", lambda: native)

    yield set_native
    config.say_once.cache_clear()


def trainer_cfg(precision, accelerator="auto"):
    return SimpleNamespace(trainer={"accelerator": accelerator, "precision": precision})


@pytest.mark.parametrize("asked", ["bf16-mixed", "bf16"])
def test_bf16_mixed_on_a_cpu_without_native_bf16_trains_in_32_true_saying_so_once(
    cpu, capsys, asked
):
    cpu(False)
    cfg = trainer_cfg(asked)
    assert config.trainer_arguments(cfg)["precision"] == "32-true"
    assert capsys.readouterr().out == config.CPU_BF16_FALLBACK + "\n"
    assert config.CPU_BF16_FALLBACK == (
        "trainer.precision bf16-mixed: this CPU has no native bf16 (AVX512-BF16 or AMX); "
        "training in 32-true"
    )
    # Every Trainer asks again (clients, a Flower node each round): the line comes once.
    assert config.trainer_arguments(cfg)["precision"] == "32-true"
    assert capsys.readouterr().out == ""
    assert cfg.trainer["precision"] == asked  # what the user asked stays in the config


def test_bf16_mixed_stays_on_a_cpu_with_native_bf16(cpu, capsys):
    cpu(True)
    assert config.trainer_arguments(trainer_cfg("bf16-mixed"))["precision"] == "bf16-mixed"
    assert config.trainer_arguments(trainer_cfg("bf16-mixed", "cpu"))["precision"] == "bf16-mixed"
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("native", [True, False])
def test_the_cpu_default_stays_32_true_and_other_precisions_stay_as_asked(cpu, capsys, native):
    cpu(native)
    assert config.trainer_arguments(trainer_cfg(None))["precision"] == "32-true"
    for asked in ("32-true", "64-true", "bf16-true"):
        assert config.trainer_arguments(trainer_cfg(asked))["precision"] == asked
    assert capsys.readouterr().out == ""


def test_a_cuda_run_keeps_bf16_mixed_whatever_its_cpu_and_accelerator_cpu_does_not(
    cpu, monkeypatch, capsys
):
    cpu(False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert config.trainer_arguments(trainer_cfg("bf16-mixed"))["precision"] == "bf16-mixed"
    assert config.trainer_arguments(trainer_cfg("bf16-mixed", "gpu"))["precision"] == "bf16-mixed"
    assert capsys.readouterr().out == ""
    assert config.trainer_arguments(trainer_cfg("bf16-mixed", "cpu"))["precision"] == "32-true"
    assert capsys.readouterr().out == config.CPU_BF16_FALLBACK + "\n"


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "native"),
    [(False, False, False), (True, False, True), (False, True, True), (True, True, True)],
)
def test_native_bf16_is_avx512_bf16_or_amx(monkeypatch, avx512_bf16, amx, native):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert config.native_cpu_bf16() is native


def finite_figures(summary: dict) -> None:
    val = summary["val"]
    assert val["n"] > 0
    for key in ("loss", "accuracy", "auroc"):
        assert math.isfinite(val[key]), (key, val[key])


@pytest.fixture(scope="module")
def central_bf16(tmp_path_factory):
    """A tiny centralized fit in bf16-mixed on a CPU with native bf16, and its Trainer's
    precision."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: False)
        mp.setattr(config, "native_cpu_bf16", lambda: True)
        seen = []
        build = centralized.build_trainer

        def spy(*args, **kwargs):
            trainer, checkpoint = build(*args, **kwargs)
            seen.append(trainer.precision)
            return trainer, checkpoint

        mp.setattr(centralized, "build_trainer", spy)
        run_dir = tmp_path_factory.mktemp("bf16") / "run"
        summary = fit.main([*TINY, *CENTRAL, "--run_dir", str(run_dir)])
    return run_dir, summary, seen


def test_a_tiny_centralized_fit_trains_in_bf16_mixed_on_a_cpu_with_native_bf16(central_bf16):
    run_dir, summary, seen = central_bf16
    assert seen == ["bf16-mixed"]
    finite_figures(summary)
    finite_figures(json.loads((run_dir / "summary.json").read_text()))
    written = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert written["trainer"]["precision"] == "bf16-mixed"


def test_a_tiny_federation_falls_back_on_every_client_with_one_line(
    cpu, monkeypatch, tmp_path, capsys
):
    cpu(False)
    seen = []
    init = client_module.Client.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        seen.append(self.trainer.precision)

    monkeypatch.setattr(client_module.Client, "__init__", spy)
    run_dir = tmp_path / "run"
    summary = fit.main([*TINY, *FEDERATED, "--run_dir", str(run_dir)])
    assert seen == ["32-true", "32-true"]
    assert capsys.readouterr().out.count(config.CPU_BF16_FALLBACK) == 1
    finite_figures(summary)
    written = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert written["trainer"]["precision"] == "bf16-mixed"  # what the user asked
