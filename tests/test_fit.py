"""`python -m pneumonia.fit` and `python -m pneumonia.evaluate` end to end, on tiny data."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from pneumonia import evaluate, fit

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "explore_run.ipynb"
TINY = [
    "--federated.enabled",
    "false",
    "--optim.scheduler",
    "cosine",
    "--data.image_size",
    "32",
    "--data.synthetic.n_patients",
    "40",
    "--data.batch_size",
    "16",
    "--model.name",
    "resnet18",
    "--model.width",
    "16",
    "--trainer.max_epochs",
    "2",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fit") / "run"
    summary = fit.main([*TINY, "--run_dir", str(run_dir)])
    return run_dir, summary


def test_run_directory_holds_config_events_checkpoints_metrics_summary(tiny_run):
    run_dir, summary = tiny_run
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["data"]["image_size"] == 32 and config["model"]["name"] == "resnet18"
    assert config["model"]["gn_groups"] == 16  # defaults are resolved into the file
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    for column in ("val/accuracy", "val/specificity", "val/auroc", "train/loss_epoch"):
        assert column in header
    rows = [line.split(",") for line in (run_dir / "split.csv").read_text().splitlines()[1:]]
    assert {r[0] for r in rows} == {"train", "val"}
    train_patients = {r[2] for r in rows if r[0] == "train"}
    val_patients = {r[2] for r in rows if r[0] == "val"}
    assert val_patients and not train_patients & val_patients
    assert sum(r[0] == "val" for r in rows) == summary["val"]["n"]
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk["synthetic"] is True and on_disk["epochs"] == 2
    val = on_disk["val"]
    assert sum(map(sum, val["confusion_matrix"])) == val["n"] > 0
    assert 0.0 <= val["accuracy"] <= 1.0


def test_output_says_the_data_is_synthetic(tmp_path, capsys):
    fit.main([*TINY, "--trainer.max_epochs", "1", "--run_dir", str(tmp_path / "r")])
    assert "SYNTHETIC" in capsys.readouterr().out


def image_steps(run_dir, tag: str) -> list[int]:
    """The steps (epochs) at which TensorBoard holds image `tag`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for events in run_dir.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"images": 0}).Reload()
        if tag in acc.Tags()["images"]:
            steps += [event.step for event in acc.Images(tag)]
    return sorted(steps)


def test_same_seed_gives_same_weights(tiny_run, tmp_path):
    """... whichever epochs draw figures (--figures_every 2: the first of the two only)."""
    run_dir, _ = tiny_run
    fit.main([*TINY, "--run_dir", str(tmp_path / "again"), "--figures_every", "2"])
    assert image_steps(run_dir, "val/roc") == [0, 1]
    assert image_steps(tmp_path / "again", "val/roc") == [0]
    assert image_steps(tmp_path / "again", "verdict/val/roc") == [0]
    first = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    second = torch.load(tmp_path / "again" / "checkpoints" / "last.ckpt", weights_only=True)[
        "state_dict"
    ]
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_checkpoint_loads_weights_only_and_carries_preprocessing(tiny_run):
    run_dir, _ = tiny_run
    ckpt = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    hparams = ckpt["hyper_parameters"]
    assert hparams["image_size"] == 32 and hparams["model"]["name"] == "resnet18"
    assert 0.0 < hparams["mean"] < 1.0 and hparams["std"] > 0


def test_evaluate_prints_one_json_object(tiny_run, kermany_root, capsys):
    run_dir, _ = tiny_run
    capsys.readouterr()
    evaluate.main(
        ["--ckpt", str(run_dir / "checkpoints" / "best.ckpt"), "--data.root", str(kermany_root)]
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    result = json.loads(out[0])
    assert set(result) == {
        "threshold",
        "threshold_source",
        "tta",
        "loss",
        "accuracy",
        "precision",
        "recall",
        "f1",
        "specificity",
        "auroc",
        "ece",
        "confusion_matrix",
        "n",
        "ci95",
    }
    assert result["threshold"] == 0.5 and result["threshold_source"] == "checkpoint"
    for key, (low, high) in result["ci95"].items():
        if key != "ece":  # a bootstrap ECE is biased upwards: its interval may miss the value
            assert low <= result[key] <= high, key
    n_images = sum(1 for p in kermany_root.rglob("*") if p.is_file())
    assert result["n"] == n_images == sum(map(sum, result["confusion_matrix"]))


def test_explore_notebook_runs_on_a_run_directory(tiny_run, monkeypatch, tmp_path):
    """Execute the notebook's code cells in-process (no Jupyter needed) against the tiny run."""
    import matplotlib

    matplotlib.use("Agg")
    run_dir, _ = tiny_run
    notebook = json.loads(NOTEBOOK.read_text())
    cells = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]
    monkeypatch.chdir(tmp_path)  # no ../runs here: the first cell finds no run
    namespace: dict = {}
    exec(cells[0], namespace)
    assert namespace["RUN_DIR"] is None
    namespace["RUN_DIR"] = run_dir
    for source in cells[1:]:
        exec(source, namespace)
    assert namespace["curve"]("val/accuracy")[0] == [0, 1]


def test_tensorboard_holds_scalars_and_figures(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = tiny_run
    tags = {"scalars": set(), "images": set()}
    for events in run_dir.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"images": 0}).Reload()
        for kind in tags:
            tags[kind] |= set(acc.Tags()[kind])
    for scalar in (
        "train/loss_epoch",
        "val/loss",
        "val/accuracy",
        "val/specificity",
        "val/auroc",
        "verdict/val/f1",
    ):
        assert scalar in tags["scalars"]
    figures = {"val/confusion_matrix", "val/roc", "verdict/val/roc", "verdict/gradcam"}
    assert figures <= tags["images"]


def test_best_checkpoint_carries_a_model_card_and_the_run_a_cases_panel(tiny_run):
    from pneumonia.training.checkpoint import model_card, read_checkpoint

    run_dir, summary = tiny_run
    _, _, ckpt = read_checkpoint(run_dir / "checkpoints" / "best.ckpt")
    card = model_card(ckpt)
    assert card["trained_on"]["images"] == sum(card["trained_on"]["per_class"].values()) > 0
    assert card["trained_on"]["source"].startswith("SYNTHETIC")
    assert card["threshold"] == summary["threshold"]
    assert card["val"]["accuracy"] == round(summary["val"]["accuracy"], 4)
    low, high = card["val_shift"]["ci95"]["auroc"]
    assert low <= card["val_shift"]["auroc"] <= high
    assert "not a diagnostic device" in card["caveat"]
    assert model_card(read_checkpoint(run_dir / "checkpoints" / "last.ckpt")[2]) == {}
    assert (run_dir / "cases.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_folder_with_test_split_reports_test_metrics(tmp_path, write_kermany):
    root = tmp_path / "chest_xray"
    write_kermany(root / "train", first_patient=100)
    write_kermany(root / "test", n_normal_patients=3, n_pneumonia_patients=4, first_patient=500)
    summary = fit.main(
        [
            *TINY,
            "--data.root",
            str(root),
            "--data.val_fraction",
            "0.3",
            "--trainer.max_epochs",
            "1",
            "--run_dir",
            str(tmp_path / "run"),
        ]
    )
    n_test = sum(1 for p in (root / "test").rglob("*") if p.is_file())
    assert summary["synthetic"] is False
    assert summary["test"]["n"] == n_test == sum(map(sum, summary["test"]["confusion_matrix"]))
    rows = (tmp_path / "run" / "split.csv").read_text().splitlines()[1:]
    assert sum(row.startswith("test,") for row in rows) == n_test


def test_evaluate_threshold_moves_the_confusion_matrix_as_computed_by_hand(
    tiny_run, kermany_root, capsys
):
    from pneumonia.data.cache import load_or_decode
    from pneumonia.data.kermany import list_image_files
    from pneumonia.inference.scoring import predict_probabilities
    from pneumonia.training.checkpoint import load_module

    run_dir, _ = tiny_run
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    module = load_module(ckpt)
    images = load_or_decode(list_image_files(kermany_root), 32, kermany_root.parent / "cache")
    probs = predict_probabilities(module, images.images)
    positive = images.labels == module.positive
    threshold = float(probs.median())  # splits the images in two, whatever the model learnt
    called = probs > threshold
    by_hand = [
        [int((~positive & ~called).sum()), int((~positive & called).sum())],
        [int((positive & ~called).sum()), int((positive & called).sum())],
    ]
    capsys.readouterr()
    argv = ["--ckpt", str(ckpt), "--data.root", str(kermany_root)]
    evaluate.main([*argv, "--threshold", str(threshold)])
    result = json.loads(capsys.readouterr().out)
    assert result["threshold"] == threshold and result["threshold_source"] == "--threshold"
    assert result["confusion_matrix"] == by_hand
    assert by_hand[0][1] + by_hand[1][1] == int(called.sum()) > 0


def test_evaluate_rejects_a_threshold_outside_zero_one(tiny_run, kermany_root, capsys):
    run_dir, _ = tiny_run
    argv = ["--ckpt", str(run_dir / "checkpoints" / "best.ckpt"), "--data.root", str(kermany_root)]
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([*argv, "--threshold", "1.5"])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "threshold 1.5 must be > 0 and < 1, or checkpoint" in err[0]


def test_evaluate_with_tta_and_shift(tiny_run, kermany_root, capsys):
    run_dir, _ = tiny_run
    capsys.readouterr()
    argv = ["--ckpt", str(run_dir / "checkpoints" / "best.ckpt"), "--data.root", str(kermany_root)]
    evaluate.main([*argv, "--tta", "true", "--shift", "true"])
    result = json.loads(capsys.readouterr().out)
    assert result["tta"] is True
    assert result["shift"]["n"] == result["n"] and "ci95" in result["shift"]


RECIPE = [
    "--data.augment.enabled", "true",
    "--data.augment.crop_area_min", "0.6",
    "--data.augment.brightness", "0.1",
    "--data.augment.contrast", "0.2",
    "--data.augment.gamma", "0.2",
    "--data.augment.noise", "0.03",
    "--data.augment.blur", "0.01",
    "--optim.label_smoothing", "0.1",
    "--optim.weight_averaging", "ema",
    "--monitor", "val_shift/loss",
]  # fmt: skip


def test_the_generalisation_recipe_trains_end_to_end(tmp_path):
    run_dir = tmp_path / "recipe"
    summary = fit.main([*TINY, *RECIPE, "--run_dir", str(run_dir)])
    assert "EMA" in summary["selected_by"] and "val_shift/loss" in summary["selected_by"]
    for split in ("val", "val_shift"):
        values = summary[split]
        for key in ("accuracy", "auroc", "loss"):
            low, high = values["ci95"][key]
            assert low <= values[key] <= high, (split, key)
    assert sum(r["n"] for r in summary["val_shift_by_kind"].values()) == summary["val"]["n"]
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val/loss", "val_shift/loss", "val_shift/ece"} <= set(header)
    # Lightning's EMA callback saves the averaged weights as the model, the raw ones beside.
    ckpt = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    assert "current_model_state" in ckpt
    raw, averaged = ckpt["current_model_state"], ckpt["state_dict"]
    assert any(not torch.equal(raw[k], averaged[k]) for k in averaged)


def test_weight_averaging_is_refused_for_federated_runs(capsys):
    with pytest.raises(SystemExit):
        fit.main([*TINY, "--federated.enabled", "true", "--optim.weight_averaging", "ema"])
    assert "federated.average_rounds" in capsys.readouterr().err


def test_monitoring_the_shift_validation_needs_it(capsys):
    with pytest.raises(SystemExit):
        fit.main([*TINY, "--data.shift.enabled", "false", "--monitor", "val_shift/loss"])
    assert "data.shift.enabled" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("key", "value"), [("crop_area_min", "0"), ("crop_area_min", "1.5"), ("blur", "-0.1")]
)
def test_bad_augmentation_settings_are_one_line(capsys, key, value):
    with pytest.raises(SystemExit):
        fit.main([*TINY, f"--data.augment.{key}", value])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"data.augment.{key} {value} must be" in err[0]
