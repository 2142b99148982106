"""`python -m pneumonia.fit` with federated.enabled, end to end on tiny synthetic data."""

import json
import logging
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pneumonia import fit
from pneumonia.data.sources import load_splits
from pneumonia.federated.aggregate import ClientUpdate
from pneumonia.federated.client import Client
from pneumonia.federated.server import ClientExcludedWarning, Server
from pneumonia.federated.strategies import normalization_keys
from pneumonia.inference.scoring import evaluate_imageset
from pneumonia.run.config import parse_fit_config
from pneumonia.run.federated import FederatedTraining
from pneumonia.run.monitor import GLOBAL_METRICS, round_row
from pneumonia.run.rounds import RoundRecord
from pneumonia.run.rundir import client_dir
from pneumonia.training.checkpoint import load_module

TINY = [
    "--figures_every", "0",  # TensorBoard figures: the reported model's only
    "--data.image_size", "32",
    "--data.synthetic.n_patients", "40",
    "--data.batch_size", "16",
    "--model.name", "resnet18",
    "--model.width", "16",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
    "--trainer.log_every_n_steps", "1",
]  # fmt: skip
NOTEBOOK = Path(__file__).parents[2] / "notebooks" / "explore_run.ipynb"
FEDERATED = [*TINY, "--federated.enabled", "true", "--federated.local_epochs", "1"]
TWO_ROUNDS = [*FEDERATED, "--federated.rounds", "2", "--threshold", "youden"]


def last_weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


def assert_same_weights(a, b, exact=False):
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key


@pytest.fixture(scope="module")
def fl_run(tmp_path_factory):
    """3 IID clients, 2 rounds of 1 local epoch; every update that reaches the server kept."""
    run_dir = tmp_path_factory.mktemp("fl") / "run"
    seen: list[ClientUpdate] = []
    original = Server.aggregate

    def spy(self, round_index, updates, failures):
        seen.extend(updates)
        return original(self, round_index, updates, failures)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Server, "aggregate", spy)
        summary = fit.main([*TWO_ROUNDS, "--run_dir", str(run_dir)])
    return run_dir, summary, seen


def test_run_directory_has_rounds_partition_checkpoints_and_summary(fl_run):
    run_dir, summary, _ = fl_run
    for name in ("config.yaml", "split.csv", "partition.csv", "summary.json"):
        assert (run_dir / name).is_file(), name
    for name in ("best.ckpt", "last.ckpt", "federated_state.pt"):
        assert (run_dir / "checkpoints" / name).is_file(), name
    rows = (run_dir / "rounds.csv").read_text().splitlines()
    header = rows[0].split(",")
    for column in ("round", "client0_n", "client2_loss", "train_loss", "val_accuracy", "round_s"):
        assert column in header
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2"]
    first = dict(zip(header, rows[1].split(","), strict=True))
    partition = (run_dir / "partition.csv").read_text().splitlines()
    sizes = [int(line.split(",")[1]) for line in partition[1:]]
    assert [int(first[f"client{j}_n"]) for j in range(3)] == sizes
    split_rows = (run_dir / "split.csv").read_text().splitlines()
    assert sum(sizes) == sum(r.startswith("train,") for r in split_rows)
    assert summary["federated"]["rounds"] == 2 and summary["federated"]["clients"] == 3
    assert summary["best_round"] in (1, 2)
    # The threshold chosen on validation is in the summary and in best.ckpt, for evaluate.
    ckpt = torch.load(run_dir / "checkpoints" / "best.ckpt")
    assert summary["threshold_rule"] == "youden" and 0.0 < summary["threshold"] < 1.0
    assert ckpt["hyper_parameters"]["threshold"] == pytest.approx(summary["threshold"])
    assert json.loads((run_dir / "summary.json").read_text())["val"]["n"] == summary["val"]["n"]


def test_best_checkpoint_reproduces_the_summary_metrics(fl_run):
    run_dir, summary, _ = fl_run
    cfg = parse_fit_config(TWO_ROUNDS)[0]
    val = load_splits(cfg.data, cfg.seed).val
    values, _ = evaluate_imageset(load_module(run_dir / "checkpoints" / "best.ckpt"), val)
    assert values["n"] == summary["val"]["n"] == len(val)
    assert values["accuracy"] == pytest.approx(summary["val"]["accuracy"])
    assert values["auroc"] == pytest.approx(summary["val"]["auroc"])
    # The round's own evaluation (at threshold 0.5) agrees with the summary's.
    header, *rows = (run_dir / "rounds.csv").read_text().splitlines()
    best_row = dict(zip(header.split(","), rows[summary["best_round"] - 1].split(","), strict=True))
    at_half = summary.get("val_at_0.5", summary["val"])
    assert float(best_row["val_accuracy"]) == pytest.approx(at_half["accuracy"], abs=1e-5)
    assert float(best_row["val_auroc"]) == pytest.approx(values["auroc"], abs=1e-5)


def scalars(path, tag):
    acc = EventAccumulator(str(path))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_tensorboard_global_curves_by_round_and_client_curves_continue(fl_run):
    run_dir, _, _ = fl_run
    assert [s for s, _ in scalars(run_dir, "global/val/accuracy")] == [1, 2]
    assert [s for s, _ in scalars(run_dir, "global/train/loss")] == [1, 2]
    steps = [s for s, _ in scalars(client_dir(run_dir, 0), "train/loss_step")]
    per_round = len(steps) // 2
    assert per_round >= 1 and steps == sorted(set(steps))  # round 2 continues round 1's axis
    assert steps[-1] >= 2 * per_round - 1
    assert scalars(client_dir(run_dir, 2), "train/loss_epoch")


def test_only_state_dicts_and_counts_cross_the_client_boundary(fl_run):
    run_dir, _, seen = fl_run
    assert len(seen) == 6  # 3 clients x 2 rounds
    reference = last_weights(run_dir)
    assert [f.name for f in fields(ClientUpdate)] == [
        "client", "state", "n", "train_loss", "train_accuracy", "epsilon"
    ]  # fmt: skip
    for update in seen:
        assert update.epsilon is None  # a number only under DP-SGD (privacy.enabled)
        assert type(update.n) is int and type(update.client) is int
        assert type(update.train_loss) is float and type(update.train_accuracy) is float
        assert update.state.keys() == reference.keys()
        for key, tensor in update.state.items():
            assert tensor.shape == reference[key].shape  # weights only: nothing per-sample
            assert tensor.dtype != torch.uint8  # no images


def test_one_client_fedavg_equals_centralized_training(tmp_path):
    central = tmp_path / "central"
    centralized = ["--federated.enabled", "false", "--trainer.max_epochs", "2"]
    fit.main([*TINY, *centralized, "--run_dir", str(central)])
    federated = tmp_path / "federated"
    fit.main(
        [
            *TINY,
            "--federated.enabled",
            "true",
            "--federated.clients",
            "1",
            "--federated.rounds",
            "1",
            "--federated.local_epochs",
            "2",
            "--run_dir",
            str(federated),
        ]  # fmt: skip
    )
    assert_same_weights(last_weights(central), last_weights(federated))


def test_fedprox_with_mu_zero_equals_fedavg(fl_run, tmp_path):
    run_dir, _, _ = fl_run
    prox = tmp_path / "prox"
    args = ["--federated.strategy", "fedprox", "--federated.mu", "0"]
    fit.main([*TWO_ROUNDS, *args, "--run_dir", str(prox)])
    assert_same_weights(last_weights(run_dir), last_weights(prox), exact=True)


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(fl_run, tmp_path, capsys):
    run_dir, _, _ = fl_run
    killed = tmp_path / "killed"
    original = Client.train_round

    def die_in_round_two(self, global_state, round_index, *args):
        if round_index == 1 and self.index == 1:
            raise KeyboardInterrupt  # as a kill: no client fault handling catches it
        return original(self, global_state, round_index, *args)

    with pytest.MonkeyPatch.context() as mp, pytest.raises(SystemExit) as exit_info:
        mp.setattr(Client, "train_round", die_in_round_two)
        fit.main([*TWO_ROUNDS, "--run_dir", str(killed)])
    assert exit_info.value.code == 130
    assert f"--resume {killed}" in capsys.readouterr().err
    assert len((killed / "rounds.csv").read_text().splitlines()) == 2  # header + round 1
    summary = fit.main(["--resume", str(killed)])
    assert summary["federated"]["rounds"] == 2
    assert_same_weights(last_weights(run_dir), last_weights(killed))
    assert (killed / "rounds.csv").read_text().count("\n") == 3
    # Client 2 had not trained in round 2 before the kill: its rebuilt Trainer continues the
    # step axis (client 0's interrupted round 2 was logged once before the kill and again after).
    steps = [s for s, _ in scalars(killed / "clients" / "client_2", "train/loss_step")]
    uninterrupted = [s for s, _ in scalars(run_dir / "clients" / "client_2", "train/loss_step")]
    assert steps == uninterrupted and steps == sorted(set(steps))


def test_a_failing_client_and_a_nan_update_are_left_out(tmp_path):
    original = Client.train_round

    def faulty(self, *args):
        if self.index == 1:
            raise RuntimeError("disk full at hospital 1")
        update = original(self, *args)
        if self.index == 2:
            update.state["model.fc.weight"] = update.state["model.fc.weight"] * float("nan")
        return update

    run_dir = tmp_path / "faulty"
    with pytest.MonkeyPatch.context() as mp, pytest.warns(ClientExcludedWarning) as caught:
        mp.setattr(Client, "train_round", faulty)
        fit.main([*FEDERATED, "--federated.rounds", "1", "--run_dir", str(run_dir)])
    messages = sorted(str(w.message) for w in caught if w.category is ClientExcludedWarning)
    assert messages[0] == "round 1: client 1 left out: raised RuntimeError: disk full at hospital 1"
    assert messages[1] == "round 1: client 2 left out: model.fc.weight holds non-finite values"
    header, row = (run_dir / "rounds.csv").read_text().splitlines()
    values = dict(zip(header.split(","), row.split(","), strict=True))
    assert values["excluded"] == "1;2" and values["client1_n"] == "" and values["client0_n"]
    assert all(torch.isfinite(v.float()).all() for v in last_weights(run_dir).values())


def test_too_few_valid_updates_fail_the_round_with_one_line(tmp_path, capsys):
    def broken(self, *args):
        raise RuntimeError("no GPU memory")

    run_dir = tmp_path / "failed"
    args = ["--federated.min_clients", "2", "--run_dir", str(run_dir)]
    with pytest.MonkeyPatch.context() as mp, pytest.raises(SystemExit) as exit_info:
        mp.setattr(Client, "train_round", broken)
        fit.main([*FEDERATED, "--federated.rounds", "1", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: round 1 failed: 0 valid update(s), federated.min_clients is 2")
    assert "--resume" in err


def test_fedbn_keeps_each_clients_norm_layers(tmp_path):
    cfg, _, _ = parse_fit_config([*TWO_ROUNDS, "--federated.strategy", "fedbn"])
    from pneumonia.federated.cohort import LocalCohort
    from pneumonia.run.config import trainer_arguments
    from pneumonia.run.inputs import RunInputs
    from pneumonia.training.recipe import make_recipe

    splits = load_splits(cfg.data, cfg.seed)
    cohort = LocalCohort(cfg, splits, trainer_arguments(cfg))
    recipe = make_recipe(cfg, splits.train.classes, cohort.moments())
    (tmp_path / "fedbn").mkdir()
    run = FederatedTraining(RunInputs(cfg, recipe, splits, tmp_path / "fedbn"), cohort)
    run.train()
    norm = normalization_keys(run.module)
    assert norm and run.strategy.local_keys == norm
    locals_ = [c.local_state for c in run.cohort.clients]
    assert all(s.keys() == norm for s in locals_)
    key = "model.bn1.weight"
    assert not torch.equal(locals_[0][key], locals_[1][key])  # each client's own
    # The next round starts each client from its own norm layers, the rest from the server.
    module = run.cohort.clients[0].module
    start = dict(run.server.global_state) | locals_[0]
    module.load_state_dict(start)
    assert torch.equal(module.state_dict()[key], locals_[0][key])
    assert not torch.equal(run.server.global_state[key], locals_[0][key])


@pytest.mark.parametrize(
    "args,message",
    [
        (["--federated.fraction", "0"], "federated.fraction 0 must be > 0 and <= 1"),
        (["--federated.fraction", "1.5"], "federated.fraction 1.5 must be > 0 and <= 1"),
        (["--federated.rounds", "0"], "federated.rounds 0 must be > 0"),
        (["--threshold", "1.5"], "threshold 1.5 must be > 0 and < 1, or youden"),
        (["--federated.clients", "40"], "federated.clients 40 is more than the"),
        (
            ["--federated.partition", "dirichlet", "--federated.clients", "12",
             "--federated.alpha", "0.01"],
            "left client(s)",
        ),
        (["--federated.partition", "sites"], "federated.partition sites needs data.root"),
    ],
)  # fmt: skip
def test_bad_federated_settings_fail_with_one_line_and_no_run_dir(tmp_path, capsys, args, message):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        fit.main([*FEDERATED, *args, "--run_dir", str(run_dir)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not run_dir.exists()


def test_sites_root_without_site_folders_is_refused(tmp_path, capsys, write_kermany):
    root = write_kermany(tmp_path / "flat")  # class folders, not hospitals
    args = ["--federated.partition", "sites", "--data.root", str(root)]
    with pytest.raises(SystemExit):
        fit.main([*FEDERATED, *args, "--run_dir", str(tmp_path / "run")])
    assert "holds class folders, not site folders" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit):
        fit.main([*FEDERATED, "--federated.partition", "sites", "--data.root", str(empty)])
    assert "has no site folders" in capsys.readouterr().err


def test_sites_partition_makes_one_client_per_hospital_folder(tmp_path, write_kermany):
    root = tmp_path / "hospitals"
    write_kermany(root / "north", 4, 5, size=(40, 40), first_patient=100)
    write_kermany(root / "south", 5, 6, size=(40, 40), first_patient=100)  # same patient ids
    run_dir = tmp_path / "run"
    args = ["--federated.partition", "sites", "--data.root", str(root), "--data.val_fraction"]
    summary = fit.main(
        [*FEDERATED, *args, "0.3", "--federated.rounds", "1", "--run_dir", str(run_dir)]
    )
    table = summary["federated"]["partition_table"]
    assert len(table) == 2
    split = [r.split(",") for r in (run_dir / "split.csv").read_text().splitlines()[1:]]
    train = [r for r in split if r[0] == "train"]
    north = [r for r in train if r[2].startswith("north/")]
    assert table[0]["images"] == len(north) and table[1]["images"] == len(train) - len(north)


def test_resume_takes_only_a_run_directory(tmp_path, capsys):
    with pytest.raises(SystemExit):
        fit.main(["--resume", str(tmp_path), "--seed", "3"])
    assert "--resume RUN_DIR takes no other options" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fit.main(["--resume", str(tmp_path)])
    assert "holds no config.yaml" in capsys.readouterr().err


def test_explore_notebook_draws_a_federated_run(fl_run):
    """The notebook's cells, in-process, on the federated run: curves by round."""
    import matplotlib

    matplotlib.use("Agg")
    run_dir, _, _ = fl_run
    notebook = json.loads(NOTEBOOK.read_text())
    cells = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]
    namespace: dict = {}
    exec(cells[0], namespace)
    namespace["RUN_DIR"] = run_dir
    for source in cells[1:]:
        exec(source, namespace)
    assert namespace["federated"] and namespace["curve"]("val_accuracy")[0] == [1, 2]
    assert "client2_loss" in namespace["losses"]


def test_kept_optimizer_state_brings_its_moments_but_not_its_learning_rate(tmp_path):
    from pneumonia.federated.client import RestoreOptimizer

    seen = []
    original = RestoreOptimizer.on_train_start

    def spy(self, trainer, pl_module):
        original(self, trainer, pl_module)
        optimizer = trainer.optimizers[0]
        seen.append((optimizer.param_groups[0]["lr"], len(optimizer.state)))

    keep = ["--federated.keep_optimizer_state", "true", "--optim.lr", "0.001"]
    keep += ["--run_dir", str(tmp_path / "run")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RestoreOptimizer, "on_train_start", spy)
        fit.main([*TWO_ROUNDS, *keep])
    # Round 2 of 2 under round_lr cosine: 1e-3 * (1 + cos(pi / 2)) / 2 = 5e-4, for 3 clients.
    assert len(seen) == 3
    assert all(lr == pytest.approx(5e-4) and moments > 0 for lr, moments in seen)


def test_resume_from_a_corrupt_round_state_is_one_line(fl_run, tmp_path, capsys):
    run_dir, _, _ = fl_run
    broken = tmp_path / "broken"
    (broken / "checkpoints").mkdir(parents=True)
    (broken / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    (broken / "checkpoints" / "federated_state.pt").write_bytes(b"junk\n")
    with pytest.raises(SystemExit) as exit_info:
        fit.main(["--resume", str(broken)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot read {broken}")


def test_average_rounds_reports_the_mean_of_the_last_global_models(tmp_path):
    globals_by_round: list[dict] = []
    original = RoundRecord.checkpoint

    def spy(self, row, server, cohort):
        globals_by_round.append({k: v.clone() for k, v in server.global_state.items()})
        return original(self, row, server, cohort)

    argv = [*FEDERATED, "--federated.rounds", "3", "--federated.average_rounds", "2"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RoundRecord, "checkpoint", spy)
        summary = fit.main([*argv, "--run_dir", str(tmp_path / "run")])
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.ckpt", weights_only=True)
    assert summary["selected_by"] == "mean of the global models of rounds 2-3"
    assert len(globals_by_round) == 3
    for key, value in best["state_dict"].items():
        if value.is_floating_point():
            mean = (globals_by_round[1][key].double() + globals_by_round[2][key].double()) / 2
            assert torch.allclose(value.double(), mean, atol=1e-6), key
        else:
            assert torch.equal(value, globals_by_round[2][key]), key
    rows = (tmp_path / "run" / "rounds.csv").read_text().splitlines()
    assert "val_shift_accuracy" in rows[0].split(",")


def test_negative_average_rounds_is_refused(capsys):
    with pytest.raises(SystemExit):
        fit.main([*FEDERATED, "--federated.rounds", "2", "--federated.average_rounds", "-1"])
    assert "federated.average_rounds -1" in capsys.readouterr().err


def test_average_rounds_beyond_the_rounds_averages_them_all():
    from pneumonia.federated.options import FederatedConfig, averaged_rounds

    assert averaged_rounds(FederatedConfig(rounds=2, average_rounds=5)) == 2
    assert averaged_rounds(FederatedConfig(rounds=8, average_rounds=3)) == 3
    assert averaged_rounds(FederatedConfig(rounds=8, average_rounds=0)) == 0


class Lines(logging.Handler):
    """Every line of the records it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines += record.getMessage().splitlines()


def test_every_line_a_federated_fit_prints_is_a_record_of_the_package_logger(tmp_path, capsys):
    # Library code logs, never prints: whoever imports the package decides where lines go.
    lines, logger = Lines(), logging.getLogger("pneumonia")
    logger.addHandler(lines)
    try:
        fit.main([*FEDERATED, "--federated.rounds", "1", "--run_dir", str(tmp_path / "run")])
    finally:
        logger.removeHandler(lines)
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith("round 1/1") for line in out)
    assert out == lines.lines


def test_round_row_takes_what_could_be_swapped_by_name():
    update = ClientUpdate(0, {}, n=8, train_loss=0.5, train_accuracy=0.75)
    evaluations = {"val": dict.fromkeys(GLOBAL_METRICS, 0.5)}
    with pytest.raises(TypeError):
        round_row(1, 2, [update], [], evaluations, 3.0, 9.0)  # type: ignore[misc]
    row = round_row(
        1,
        n_clients=2,
        updates=[update],
        excluded=[],
        evaluations=evaluations,
        round_s=3.0,
        elapsed_s=9.0,
    )
    assert row["client0_n"] == 8 and row["client1_n"] == ""
    assert (row["round_s"], row["elapsed_s"]) == (3.0, 9.0)
