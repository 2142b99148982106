"""Differential privacy: DP-SGD with Opacus on the clients and centrally, its accountant,
its refusals, resume, and the server-side DP-FedAvg wrapper."""

import csv
import math
import os
import re
import signal

import lightning as L
import pytest
import torch
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants.rdp import RDPAccountant
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from pneumonia import fit
from pneumonia.core.errors import UserError
from pneumonia.federated.aggregate import ClientUpdate
from pneumonia.federated.client import Client
from pneumonia.federated.options import ServerDPConfig
from pneumonia.federated.strategies import FedAdam, FedAvg, ServerDP, clip_update
from pneumonia.run import centralized
from pneumonia.run.config import parse_fit_config
from pneumonia.training.checkpoint import model_card, read_checkpoint
from pneumonia.training.privacy import (
    DPSGD,
    PrivacyConfig,
    check_budget,
    check_privacy,
    make_private,
)
from pneumonia.training.recipe import Recipe, build_module

TINY = [
    "--figures_every", "0",  # TensorBoard figures: the reported model's only
    "--data.image_size", "32",
    "--data.synthetic.n_patients", "40",
    "--data.batch_size", "8",
    "--model.name", "se_resnet18",
    "--model.norm", "gn",
    "--model.width", "16",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
    "--trainer.log_every_n_steps", "1",
]  # fmt: skip
PRIVATE = ["--privacy.enabled", "true", "--privacy.delta", "1e-3", "--data.balance", "none"]
FEDERATED = [
    *TINY, *PRIVATE,
    "--federated.enabled", "true",
    "--federated.local_epochs", "1",
    "--federated.rounds", "2",
    "--privacy.target_epsilon", "4",
]  # fmt: skip


def rdp_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """Opacus's own RDP analysis, called directly."""
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
    return get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0]


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def private_fl(tmp_path_factory):
    """3 private clients, 2 rounds of 1 local epoch, budget epsilon 4 at delta 1e-3."""
    run_dir = tmp_path_factory.mktemp("dp") / "run"
    summary = fit.main([*FEDERATED, "--run_dir", str(run_dir)])
    return run_dir, summary


def test_every_client_ends_at_the_target_epsilon_and_reports_it_per_round(private_fl):
    run_dir, summary = private_fl
    rows = read_rows(run_dir / "rounds.csv")
    assert len(rows) == 2
    for j in range(3):
        first, last = float(rows[0][f"client{j}_epsilon"]), float(rows[1][f"client{j}_epsilon"])
        assert 0 < first < last  # the budget is spent round by round
        assert last == pytest.approx(4.0, abs=0.05)  # calibrated to end the run at the target
    assert float(rows[1]["epsilon"]) == max(float(rows[1][f"client{j}_epsilon"]) for j in range(3))
    clients = summary["privacy"]["clients"]
    assert clients["epsilon"] == pytest.approx(float(rows[1]["epsilon"]))
    assert clients["delta"] == 1e-3 and clients["accountant"] == "rdp"
    assert set(clients["epsilon_per_client"]) == {"0", "1", "2"}


def test_epsilon_in_tensorboard_and_model_card(private_fl):
    run_dir, summary = private_fl
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert [e.step for e in events.Scalars("privacy/epsilon")] == [1, 2]
    client = EventAccumulator(str(run_dir / "clients" / "client_1"))
    client.Reload()
    assert len(client.Scalars("train/epsilon")) == 2  # one per local epoch
    _, _, ckpt = read_checkpoint(run_dir / "checkpoints" / "best.ckpt")
    card = model_card(ckpt)["privacy"]["clients"]
    assert card["epsilon"] == summary["privacy"]["clients"]["epsilon"]
    assert card["delta"] == 1e-3 and "image" in card["protects"]


def test_dp_sgd_takes_its_three_counts_by_name():
    # images, batch size and planned steps are three ints in a row: swapped, epsilon is wrong.
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    cfg = PrivacyConfig(enabled=True, noise_multiplier=1.1, delta=1e-5)
    with pytest.raises(TypeError, match="positional"):
        DPSGD(model, cfg, 1000, 32, 1000)


def test_the_accountant_agrees_with_opacus_own_analysis():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 2))
    cfg = PrivacyConfig(enabled=True, noise_multiplier=1.1, delta=1e-5)
    dp = DPSGD(model, cfg, images=1000, batch_size=32, planned_steps=1000)
    optimizer = dp.wrap(torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 2, (32,))
    for _ in range(5):
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert dp.steps() == 5
    assert dp.epsilon() == pytest.approx(rdp_epsilon(1.1, 0.032, 5, 1e-5), rel=1e-9)
    # 1,000 steps (written down in docs/design/privacy.md as 6.035 from the same analysis):
    dp.accountant.history = [(1.1, 0.032, 1000)]
    assert dp.epsilon() == pytest.approx(6.035, abs=5e-3)


def test_a_target_epsilon_is_reached_at_the_planned_step():
    cfg = PrivacyConfig(enabled=True, target_epsilon=3.0, delta=1e-5)
    model = nn.Linear(2, 2)
    dp = DPSGD(model, cfg, images=1480, batch_size=32, planned_steps=200)
    assert dp.epsilon() == 0.0
    spent = rdp_epsilon(dp.noise_multiplier, 32 / 1480, 200, 1e-5)
    assert spent == pytest.approx(3.0, abs=0.03) and spent <= 3.0 + 1e-6


def linear_step(max_grad_norm: float, noise: float = 0.0) -> torch.Tensor:
    """One DP-SGD step (lr 1) of f(x) = w . x from w = 0 on x1 = (3, 0), x2 = (0, 4), loss the
    batch mean of f: each image's own gradient is its x."""
    model = nn.Linear(2, 1, bias=False)
    nn.init.zeros_(model.weight)
    cfg = PrivacyConfig(enabled=True, noise_multiplier=noise, max_grad_norm=max_grad_norm)
    dp = DPSGD(model, cfg, images=10_000, batch_size=2, planned_steps=1)
    optimizer = dp.wrap(torch.optim.SGD(model.parameters(), lr=1.0))
    x = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    model(x).sum().div(2).backward()
    optimizer.step()
    return model.weight.detach()[0]


def test_without_noise_and_clipping_dp_sgd_is_sgd_by_hand():
    # mean gradient ((3, 0) + (0, 4)) / 2 = (1.5, 2): w = -(1.5, 2)
    assert torch.allclose(linear_step(max_grad_norm=1e6), torch.tensor([-1.5, -2.0]))


def test_a_small_clip_norm_bounds_every_image_gradient_by_hand():
    # norms 3 and 4, clipped to 1: (1, 0) and (0, 1), averaged over B = 2: w = -(0.5, 0.5)
    assert torch.allclose(linear_step(max_grad_norm=1.0), torch.tensor([-0.5, -0.5]))


def test_noise_and_clip_norm_0_make_a_step_pure_noise_of_the_stated_size():
    torch.manual_seed(0)
    steps = torch.stack([linear_step(max_grad_norm=1e-9, noise=1e9) for _ in range(200)])
    # std noise_multiplier x clip / B = 1e9 x 1e-9 / 2 = 0.5 per coordinate
    assert steps.std().item() == pytest.approx(0.5, rel=0.15)


def tiny_module():
    recipe = Recipe(
        model={"name": "se_resnet18", "norm": "gn", "width": 16, "gn_groups": 8},
        optim={"name": "sgd", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0, "scheduler": "none"},
        image_size=32,
    )
    torch.manual_seed(0)
    return build_module(recipe)


def test_on_the_tiny_se_resnet_dp_sgd_without_noise_or_clip_equals_plain_sgd():
    images = torch.randint(0, 256, (6, 1, 32, 32), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    plain, private = tiny_module(), tiny_module()
    cfg = PrivacyConfig(enabled=True, noise_multiplier=0.0, max_grad_norm=1e6)
    make_private(private, cfg, images=6, batch_size=6, planned_steps=1)
    for module in (plain, private):
        module.train()
        optimizer = module.configure_optimizers()
        module.training_loss(module(images), labels).backward()
        optimizer.step()
    pairs = zip(plain.state_dict().items(), private.state_dict().values(), strict=True)
    for (name, a), b in pairs:
        assert torch.allclose(a, b, atol=1e-5), name
    assert any(
        not torch.equal(a, b)
        for a, b in zip(
            tiny_module().state_dict().values(), plain.state_dict().values(), strict=True
        )
    )


def test_batchnorm_is_refused_in_one_line_naming_groupnorm(tmp_path, capsys):
    runs = tmp_path / "runs"
    with pytest.raises(SystemExit) as exit_info:
        argv = [*TINY, *PRIVATE, "--model.norm", "bn", "--privacy.noise_multiplier", "1"]
        fit.main([*argv, "--runs_root", str(runs)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "BatchNorm" in err[0] and "model.norm gn" in err[0]
    assert not runs.exists()


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--model.name", "resnet18"], "use se_resnet18 with model.norm gn"),
        (["--data.balance", "sampler"], "not Poisson sampling"),
        (["--data.balance", "loss_weights"], "privacy.class_weights"),
        (["--privacy.augment_multiplicity", "2", "--data.augment.enabled", "false"], "augment"),
        (["--privacy.physical_batch_size", "4", "--optim.interval", "step"], "interval epoch"),
        (["--privacy.class_weights", "[1, 2, 3]"], "one per class"),
        (["--trainer.precision", "16-mixed"], "16-mixed"),
        (["--privacy.target_epsilon", "3"], "exactly one of"),
        (["--privacy.delta", "0.5"], "must be below 1 /"),
        (["--trainer.accumulate_grad_batches", "2"], "accumulate_grad_batches"),
        (["--trainer.gradient_clip_val", "1"], "gradient_clip_val"),
        (["--federated.enabled", "true", "--federated.strategy", "fedprox"], "fedprox"),
    ],
)
def test_what_cannot_be_private_is_refused_before_training(extra, words, tmp_path, capsys):
    runs = tmp_path / "runs"
    with pytest.raises(SystemExit) as exit_info:
        argv = [*TINY, *PRIVATE, "--federated.enabled", "false", "--privacy.noise_multiplier"]
        fit.main([*argv, "1", *extra, "--runs_root", str(runs)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: privacy") and words in err[-1]
    assert not any(runs.rglob("*.ckpt"))


def test_a_resumed_federation_reports_the_epsilon_of_an_uninterrupted_one(private_fl, tmp_path):
    run_dir, summary = private_fl
    killed = tmp_path / "killed"
    original = Client.train_round

    def die_in_round_two(self, global_state, round_index, *args):
        if round_index == 1 and self.index == 1:
            raise KeyboardInterrupt
        return original(self, global_state, round_index, *args)

    with pytest.MonkeyPatch.context() as mp, pytest.raises(SystemExit):
        mp.setattr(Client, "train_round", die_in_round_two)
        fit.main([*FEDERATED, "--run_dir", str(killed)])
    resumed = fit.main(["--resume", str(killed)])
    assert resumed["privacy"] == summary["privacy"]
    assert (
        read_rows(killed / "rounds.csv")[1]["epsilon"]
        == read_rows(run_dir / "rounds.csv")[1]["epsilon"]
    )


def test_a_resumed_central_run_keeps_the_epsilon_spent(tmp_path):
    central = [*TINY, *PRIVATE, "--federated.enabled", "false", "--privacy.noise_multiplier", "1"]
    whole = fit.main([*central, "--trainer.max_epochs", "2", "--run_dir", str(tmp_path / "a")])
    first = fit.main([*central, "--trainer.max_epochs", "1", "--run_dir", str(tmp_path / "b")])
    config = tmp_path / "b" / "config.yaml"
    config.write_text(config.read_text().replace("max_epochs: 1", "max_epochs: 2"))
    resumed = fit.main(["--resume", str(tmp_path / "b")])
    spent = whole["privacy"]["dp_sgd"]
    assert first["privacy"]["dp_sgd"]["epsilon"] < spent["epsilon"]
    assert resumed["privacy"]["dp_sgd"] == spent
    assert spent["epsilon"] == pytest.approx(
        rdp_epsilon(1.0, spent["sample_rate"], spent["steps"], 1e-3), abs=1e-4
    )


CENTRAL = [*TINY, *PRIVATE, "--federated.enabled", "false", "--privacy.noise_multiplier", "1"]
EMA = ["--optim.weight_averaging", "ema", "--optim.ema_decay", "0.5", "--trainer.max_epochs", "2"]


def weights_of(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class RawWeights(L.Callback):
    """The weights DP-SGD produced: before training, after each step, at each epoch's end."""

    def __init__(self) -> None:
        self.initial: dict = {}
        self.steps: list[dict] = []
        self.epochs: list[dict] = []

    def on_train_start(self, trainer, module) -> None:
        self.initial = weights_of(module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.steps.append(weights_of(module))

    def on_train_epoch_end(self, trainer, module) -> None:
        self.epochs.append(weights_of(module))


def private_fit(argv: list[str], extra: list[L.Callback] | None = None) -> tuple[dict, list]:
    """fit.main with `extra` callbacks on the run's Trainer; the summary and the Trainers."""
    trainers, build = [], centralized.build_trainer

    def with_extra(*args, **kwargs):
        trainer, checkpoint = build(*args, **kwargs)
        trainer.callbacks[:0] = extra or []
        trainers.append(trainer)
        return trainer, checkpoint

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(centralized, "build_trainer", with_extra)
        return fit.main(argv), trainers


def checkpoint_of(run_dir, name: str = "last") -> dict:
    return torch.load(run_dir / "checkpoints" / f"{name}.ckpt", weights_only=True)


def ema_by_hand(states: list[dict], decay: float) -> dict:
    """torch's AveragedModel EMA: the first state, then decay x average + (1 - decay) x state."""
    average = dict(states[0])
    for state in states[1:]:
        average = {k: decay * average[k] + (1 - decay) * state[k] for k in average}
    return average


def mean_by_hand(states: list[dict]) -> dict:
    return {k: sum(s[k] for s in states) / len(states) for k in states[0]}


def assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-7), k


def differs(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def private_ema(tmp_path_factory):
    """A private central run of 2 epochs with an EMA (decay 0.5) of the weights, and the raw
    weights DP-SGD produced at every step."""
    run_dir = tmp_path_factory.mktemp("dp_ema") / "run"
    raw = RawWeights()
    summary, trainers = private_fit([*CENTRAL, *EMA, "--run_dir", str(run_dir)], [raw])
    return run_dir, summary, raw, trainers[0]


def test_a_private_central_run_validates_and_keeps_the_ema_of_the_dp_sgd_weights(private_ema):
    run_dir, summary, raw, _ = private_ema
    assert "EMA" in summary["selected_by"]
    steps = summary["privacy"]["dp_sgd"]["steps"]
    assert len(raw.steps) == steps == 12
    for name in ("best", "last"):
        ckpt = checkpoint_of(run_dir, name)
        updates = int(ckpt["averaging_state"]["n_averaged"])
        assert updates == steps // 2 * (ckpt["epoch"] + 1)  # every step of every epoch so far
        assert_close(ckpt["state_dict"], ema_by_hand(raw.steps[:updates], 0.5))
        assert_close(ckpt["current_model_state"], raw.steps[updates - 1])
    last = checkpoint_of(run_dir)
    assert differs(last["state_dict"], last["current_model_state"])
    assert differs(last["state_dict"], raw.initial)


def test_the_averaged_copy_holds_neither_the_accountant_nor_the_per_sample_hooks(private_ema):
    _, _, _, trainer = private_ema
    averaging = next(c for c in trainer.callbacks if isinstance(c, centralized.PrivateEMA))
    copy = averaging._average_model.module
    assert copy.privacy is None
    assert not any(m._forward_hooks or m._backward_hooks for m in copy.modules())
    assert not hasattr(copy.model, "autograd_grad_sample_hooks")
    trained = trainer.lightning_module  # still private: its hooks are its own
    assert trained.privacy is not None
    assert any(m._forward_hooks for m in trained.modules())


def test_averaging_spends_no_privacy_and_leaves_the_training_alone(private_ema, tmp_path):
    run_dir, summary, _, _ = private_ema
    plain = fit.main([*CENTRAL, "--trainer.max_epochs", "2", "--run_dir", str(tmp_path / "p")])
    assert plain["privacy"] == summary["privacy"]  # the same epsilon, steps and noise
    raw = checkpoint_of(run_dir)["current_model_state"]
    assert not differs(raw, checkpoint_of(tmp_path / "p")["state_dict"])


def test_a_private_central_run_averages_its_epoch_end_weights_with_swa(tmp_path):
    argv = [*CENTRAL, "--optim.weight_averaging", "swa", "--optim.swa_start", "0"]
    raw = RawWeights()
    summary, _ = private_fit(
        [*argv, "--trainer.max_epochs", "3", "--run_dir", str(tmp_path)], [raw]
    )
    assert "SWA" in summary["selected_by"] and summary["privacy"]["dp_sgd"]["steps"] == 18
    for name in ("best", "last"):
        ckpt = checkpoint_of(tmp_path, name)
        updates = int(ckpt["averaging_state"]["n_averaged"])
        assert_close(ckpt["state_dict"], mean_by_hand(raw.epochs[:updates]))
        assert differs(ckpt["state_dict"], ckpt["current_model_state"])
    assert updates == 3  # last.ckpt: every epoch's end


def test_a_resumed_private_ema_run_ends_at_the_weights_of_an_uninterrupted_one(
    private_ema, tmp_path
):
    run_dir, summary, _, _ = private_ema

    class TermAfterTheFirstEpoch(L.Callback):
        def on_train_epoch_end(self, trainer, module) -> None:
            if trainer.current_epoch == 0:
                os.kill(os.getpid(), signal.SIGTERM)  # the run stops between batches

    killed = tmp_path / "killed"
    with pytest.raises(SystemExit) as stopped:
        private_fit([*CENTRAL, *EMA, "--run_dir", str(killed)], [TermAfterTheFirstEpoch()])
    assert stopped.value.code == 143 and checkpoint_of(killed)["epoch"] == 0
    resumed = fit.main(["--resume", str(killed)])
    assert resumed["privacy"] == summary["privacy"]
    whole, again = checkpoint_of(run_dir), checkpoint_of(killed)
    for key in ("state_dict", "current_model_state", "averaging_state"):
        assert not differs(again[key], whole[key]), key


def update(client: int, state: dict, n: int = 10) -> ClientUpdate:
    return ClientUpdate(client, state, n, 0.0, 1.0)


def test_server_dp_clips_an_oversized_update_to_the_bound():
    zero = {"w": torch.zeros(2), "b": torch.zeros(1)}
    big = {"w": torch.tensor([30.0, 40.0]), "b": torch.tensor([0.0])}  # norm 50
    clipped, norm = clip_update(big, zero, bound=2.0)
    assert norm == pytest.approx(50.0)
    assert torch.allclose(clipped["w"].float(), torch.tensor([1.2, 1.6]))  # 2 x (0.6, 0.8)
    small = {"w": torch.tensor([0.3, 0.4]), "b": torch.tensor([0.0])}
    assert torch.allclose(clip_update(small, zero, bound=2.0)[0]["w"].float(), small["w"])


def test_server_dp_without_noise_averages_clipped_updates_over_the_sampled_clients():
    zero = {"w": torch.zeros(2)}
    cfg = ServerDPConfig(enabled=True, noise_multiplier=0.0, clip_norm=1.0)
    dp = ServerDP(FedAvg(), cfg, per_round=2, clients=4, seed=0)
    out = dp.aggregate(
        zero,
        [update(0, {"w": torch.tensor([30.0, 40.0])}), update(1, {"w": torch.tensor([0.0, 0.5])})],
    )
    # (0.6, 0.8) + (0, 0.5), over the m = 2 sampled clients, whatever their image counts
    assert torch.allclose(out["w"], torch.tensor([0.3, 0.65]))
    assert dp.epsilon() == math.inf


def test_server_dp_noise_accountant_and_composition_with_fedadam():
    zero = {"w": torch.zeros(1000)}
    cfg = ServerDPConfig(enabled=True, noise_multiplier=2.0, clip_norm=1.0, delta=1e-3)
    dp = ServerDP(FedAvg(), cfg, per_round=4, clients=4, seed=0)
    updates = [update(j, {"w": torch.zeros(1000)}) for j in range(4)]
    noisy = dp.aggregate(zero, updates)["w"]
    assert noisy.std().item() == pytest.approx(2.0 * 1.0 / 4, rel=0.1)  # z C / m
    assert dp.epsilon() == pytest.approx(rdp_epsilon(2.0, 1.0, 1, 1e-3), rel=1e-9)
    state = dp.state_dict()
    again = ServerDP(FedAvg(), cfg, per_round=4, clients=4, seed=0)
    again.load_state_dict(state)
    assert again.epsilon() == dp.epsilon()
    assert torch.equal(again.aggregate(zero, updates)["w"], dp.aggregate(zero, updates)["w"])
    adam = ServerDP(FedAdam(["w"], lr=0.01, momentum=0.9), cfg, per_round=4, clients=4, seed=0)
    step = adam.aggregate(zero, updates)["w"]
    assert step.abs().max().item() == pytest.approx(0.01, rel=0.05)  # Adam's first step: lr


def test_server_dp_in_a_federation_reports_its_epsilon_per_round(tmp_path):
    argv = [
        *TINY,
        "--federated.enabled", "true",
        "--federated.rounds", "2",
        "--federated.local_epochs", "1",
        "--federated.server_dp.enabled", "true",
        "--federated.server_dp.noise_multiplier", "1.5",
        "--federated.server_dp.delta", "0.1",
    ]  # fmt: skip
    summary = fit.main([*argv, "--run_dir", str(tmp_path / "run")])
    rows = read_rows(tmp_path / "run" / "rounds.csv")
    expected = [rdp_epsilon(1.5, 1.0, r, 0.1) for r in (1, 2)]
    assert [float(r["server_epsilon"]) for r in rows] == pytest.approx(expected, abs=1e-4)
    assert summary["privacy"]["server"]["epsilon"] == pytest.approx(expected[1], abs=1e-4)


def test_the_prv_accountant_is_tighter_than_rdp_for_the_same_steps():
    history = [(1.1, 0.032, 1000)]
    spent = {}
    for name in ("rdp", "prv"):
        cfg = PrivacyConfig(enabled=True, noise_multiplier=1.1, accountant=name)
        dp = DPSGD(nn.Linear(2, 2), cfg, images=1000, batch_size=32, planned_steps=1000)
        dp.accountant.history = list(history)
        spent[name] = dp.epsilon()
    # docs/design/privacy.md: 6.035 (RDP) and 5.516 (PRV) from Opacus's own functions
    assert spent["rdp"] == pytest.approx(6.035, abs=5e-3)
    assert spent["prv"] == pytest.approx(5.516, abs=0.05) and spent["prv"] < spent["rdp"]


def test_a_budget_dp_sgd_cannot_reach_is_one_line_before_any_run_directory(tmp_path, capsys):
    runs = tmp_path / "runs"
    argv = [*TINY, *PRIVATE, "--federated.enabled", "false", "--trainer.max_epochs", "1"]
    with pytest.raises(SystemExit) as exit_info:
        fit.main([*argv, "--privacy.target_epsilon", "0.01", "--runs_root", str(runs)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "error: privacy.target_epsilon 0.01 is below what DP-SGD can reach for the training "
        "split at privacy.delta 0.001 with the rdp accountant ("
    )
    assert err[0].endswith("or more") and not runs.exists()


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_the_smallest_reachable_epsilon_named_is_reached(accountant):
    argv = ["--privacy.enabled", "true", "--privacy.accountant", accountant]
    cfg = parse_fit_config([*argv, "--privacy.target_epsilon", "0.001"])[0]
    images = {"client 0": 300, "client 1": 2000}
    with pytest.raises(UserError, match=r"for client 0 at privacy.delta 1e-05") as refused:
        check_budget(cfg, images)
    least = float(
        re.search(r"raise privacy.target_epsilon to (\S+) or more", str(refused.value))[1]
    )
    cfg.privacy.target_epsilon = least
    check_budget(cfg, images)  # Opacus finds a noise for it: the suggestion works
    assert 0.001 < least < 0.2


def test_a_privacy_setting_without_privacy_enabled_is_refused_not_ignored(tmp_path, capsys):
    runs = tmp_path / "runs"
    argv = [*TINY, "--federated.enabled", "false", "--trainer.max_epochs", "1"]
    with pytest.raises(SystemExit) as exit_info:
        fit.main([*argv, "--privacy.target_epsilon", "8", "--runs_root", str(runs)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: privacy.target_epsilon is set but privacy.enabled is false, so training would "
        "not be private: set privacy.enabled true, or drop privacy.target_epsilon"
    )
    assert not runs.exists()


@pytest.mark.parametrize(
    "setting",
    [
        ["--privacy.noise_multiplier", "1"],
        ["--privacy.max_grad_norm", "2"],
        ["--privacy.delta", "1e-6"],
        ["--privacy.accountant", "prv"],
    ],
)
def test_every_privacy_setting_counts_and_a_run_config_at_its_defaults_still_resumes(setting):
    key = setting[0][2:]
    with pytest.raises(UserError, match=rf"^{key} is set but privacy.enabled is false"):
        check_privacy(parse_fit_config(setting)[0])
    # config.yaml of an earlier run holds every privacy key, at its default: not refused
    written = parse_fit_config([])[1]
    assert "privacy:\n  enabled: false\n  noise_multiplier: null" in written
    check_privacy(parse_fit_config(["--config", written])[0])
