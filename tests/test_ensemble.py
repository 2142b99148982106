"""Ensembles: the stacking meta-learner, the `Ensemble` model, and `python -m pneumonia.ensemble`
end to end on two tiny members that share their validation images."""

from __future__ import annotations

import csv
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_image
from torch import nn

from pneumonia import ensemble, evaluate, export, fit, predict
from pneumonia.core.errors import UserError
from pneumonia.data.sources import load_splits
from pneumonia.inference.predictor import Predictor
from pneumonia.inference.scoring import predict_probabilities
from pneumonia.models.ensemble_model import Ensemble
from pneumonia.models.factory import ModelConfig, create_model
from pneumonia.run import stacking
from pneumonia.run.config import parse_fit_config
from pneumonia.serve.app import answer
from pneumonia.training.checkpoint import load_module, read_checkpoint, write_checkpoint

N_PATIENTS = 60
TINY = [
    "--figures_every", "0",  # TensorBoard figures: the reported model's only
    "--federated.enabled", "false",
    "--data.image_size", "32",
    "--data.synthetic.n_patients", str(N_PATIENTS),
    "--data.batch_size", "16",
    "--model.width", "16",
    "--trainer.max_epochs", "1",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]  # fmt: skip


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def logit(p):
    return np.log(p) - np.log1p(-p)


# --- the meta-learner ---------------------------------------------------------------------


def test_the_informative_member_gets_the_larger_coefficient():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    z = np.stack([2.0 * (2 * y - 1) + rng.normal(0, 1.5, 400), rng.normal(0, 2, 400)], 1)
    meta = stacking.fit_meta(z, y)
    informative, noise = meta.coef_[0]
    assert informative > 0.5 and abs(noise) < informative / 5


def test_out_of_fold_probabilities_come_from_learners_that_never_saw_the_patient():
    rng = np.random.default_rng(1)
    patients = [f"p{i // 2}" for i in range(80)]  # two images per patient, one class each
    y = np.array([int(i // 2 % 2 == 0) for i in range(80)])
    z = np.stack([3 * (2 * y - 1) + rng.normal(0, 0.5, 80), rng.normal(0, 1, 80)], 1)
    oof, learners, fold_of = stacking.cross_fit(z, y, patients, folds=4, seed=0)
    assert len(learners) == 4 and set(fold_of) == set(patients)
    assert ((oof > 0.5) == (y == 1)).all()  # separable: every held-out image on its side
    for k, learner in enumerate(learners):
        held = np.array([fold_of[p] == k for p in patients])
        refit = stacking.fit_meta(z[~held], y[~held])  # the other folds' patients only
        assert np.allclose(oof[held], stacking.stacked(refit, z[held]))
        assert np.allclose(refit.coef_, learner.coef_)
    again, _, _ = stacking.cross_fit(z, y, patients, folds=4, seed=0)
    assert np.array_equal(oof, again)  # the seed fixes the folds


def test_too_many_folds_or_one_class_is_a_user_error():
    z, y = np.zeros((6, 2)), np.array([0, 1, 0, 1, 0, 1])
    with pytest.raises(UserError, match="--folds 5: give from 2 to 3"):
        stacking.cross_fit(z, y, ["a", "a", "b", "b", "c", "c"], folds=5, seed=0)
    with pytest.raises(UserError, match="all of one class"):
        stacking.fit_meta(z, np.ones(6, dtype=int))


# --- the model ----------------------------------------------------------------------------


class Fixed(nn.Module):
    """A member whose softmax is `probs` [B, C] whatever the image; records its input."""

    def __init__(self, probs: list[list[float]]) -> None:
        super().__init__()
        self.logits = torch.tensor(probs).log()
        self.seen = None

    def forward(self, x):
        self.seen = x
        return self.logits


P1, P2, P3 = [0.9, 0.2, 0.5], [0.7, 0.4, 0.999999999], [0.1, 0.6, 0.3]  # P(pneumonia) each


def fixed_members():
    two = lambda p: [[1 - q, q] for q in p]  # noqa: E731
    # The third member has three classes (NORMAL, BACTERIA, VIRUS): P(pneumonia) = 1 - P(N).
    three = [[1 - q, q / 2, q / 2] for q in P3]
    return [Fixed(two(P1)), Fixed(two(P2)), Fixed(three)]


def make(rule: str, coef: list[float], intercept: float = 0.0) -> Ensemble:
    return Ensemble(
        fixed_members(), [0.5, 0.4, 0.0], [0.25, 0.2, 1.0], [(1, False), (1, False), (0, True)],
        rule, coef, intercept,
    )  # fmt: skip


def test_stacking_is_the_logistic_regression_of_the_member_logits():
    coef, intercept = [0.8, -0.3, 1.7], 0.25
    model = make("stacking", coef, intercept)
    x = torch.rand(3, 1, 8, 8)
    probs = model(x).softmax(1)[:, 1].double().numpy()
    p = np.clip(np.array([P1, P2, P3]).T, 1e-6, 1 - 1e-6)
    assert np.allclose(probs, sigmoid(intercept + logit(p) @ np.array(coef)), atol=1e-6)
    assert torch.allclose(model.members[0].seen, (x - 0.5) / 0.25)  # its own normalisation
    assert torch.allclose(model.members[1].seen, (x - 0.4) / 0.2)


def test_soft_vote_is_the_mean_probability():
    model = make("soft_vote", [1 / 3] * 3)
    probs = model(torch.rand(3, 1, 8, 8)).softmax(1)[:, 1].double().numpy()
    assert np.allclose(probs, np.mean([P1, P2, P3], axis=0), atol=1e-6)


def test_the_registered_builder_keeps_members_and_coefficients_in_the_state_dict():
    member = {"model": {"name": "resnet18", "width": 16}, "mean": 0.5, "std": 0.25,
              "image_size": 32, "classes": ["NORMAL", "PNEUMONIA"],
              "positive_class": "PNEUMONIA", "name": "m.ckpt"}  # fmt: skip
    spec = {"rule": "stacking", "members": [member, member], "coef": [1.0, 2.0], "intercept": 0.5}
    model = create_model(ModelConfig(name="ensemble", ensemble=spec), image_size=32)
    keys = model.state_dict().keys()
    assert "coef" in keys and "intercept" in keys
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in keys if "." in k} == {
        "members.0",
        "members.1",
    }
    assert model.coef.tolist() == [1.0, 2.0]
    with pytest.raises(UserError, match="pneumonia.ensemble"):
        create_model(ModelConfig(name="ensemble"))  # fit cannot train one


# --- end to end ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> list[Path]:
    """Two tiny runs on the same synthetic data and seed (so the same validation patients)."""
    root = tmp_path_factory.mktemp("members")
    paths = []
    for name in ("resnet18", "se_resnet18"):
        fit.main([*TINY, "--model.name", name, "--run_dir", str(root / name)])
        paths.append(root / name / "checkpoints" / "best.ckpt")
    return paths


@pytest.fixture(scope="module")
def stacked(members, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ensemble") / "e.ckpt"
    report = ensemble.main(["--members", *map(str, members), "--out", str(out), "--folds", "3"])
    return out, report


@pytest.fixture(scope="module")
def val_images():
    """The members' validation images, drawn as their runs drew them."""
    cfg, _, _ = parse_fit_config(TINY)
    return load_splits(cfg.data, cfg.seed).val


def member_probabilities(members: list[Path], names: list[str], split: str = "val"):
    """[N, K]: each member's predictions.csv probability of the named images."""
    out = []
    for path in members:
        with open(path.parents[1] / "predictions.csv", newline="") as f:
            rows = {
                r["image"]: float(r["probability"])
                for r in csv.DictReader(f)
                if r["split"] == split
            }
        out.append([rows[n] for n in names])
    return np.array(out).T


def test_the_checkpoint_scores_as_the_meta_learner_fitted_on_all_validation_images(
    members, stacked, val_images
):
    out, report = stacked
    assert report["val"]["images"] == len(val_images)
    assert out.is_file() and out.with_suffix(".json").is_file()
    assert json.loads(out.with_suffix(".json").read_text()) == json.loads(json.dumps(report))
    probs = member_probabilities(members, val_images.names)
    y = (val_images.labels == 1).numpy().astype(int)
    meta = stacking.fit_meta(logit(np.clip(probs, 1e-6, 1 - 1e-6)), y)
    assert np.allclose(meta.coef_[0], report["stacking"]["coef"])
    module = load_module(out)
    scored = predict_probabilities(module, val_images.images).double().numpy()
    expected = stacking.stacked(meta, logit(np.clip(probs, 1e-6, 1 - 1e-6)))
    assert np.allclose(scored, expected, atol=1e-5)
    recipe, state, ckpt = read_checkpoint(out)
    assert (recipe.mean, recipe.std, recipe.threshold, recipe.image_size) == (0.0, 1.0, 0.5, 32)
    assert recipe.model["ensemble"]["coef"] == pytest.approx(report["stacking"]["coef"])
    assert any(k.startswith("model.members.1.") for k in state) and "model.coef" in state
    card = ckpt["model_card"]
    assert card["ensemble"]["rule"] == "stacking" and len(card["ensemble"]["members"]) == 2
    assert card["val"] == report["val"]["methods"]["stacking"]  # the out-of-fold figures
    methods = report["val"]["methods"]
    assert list(methods) == ["stacking", "soft_vote", "member 1 (resnet18)",
                             "member 2 (se_resnet18)"]  # fmt: skip
    assert methods["member 1 (resnet18)"]["n"] == len(val_images)
    assert set(report["val_shift"]["methods"]) >= {"stacking", "stacking (all val)", "soft_vote"}


def test_soft_vote_checkpoint_scores_the_mean(members, val_images, tmp_path):
    out = tmp_path / "vote.ckpt"
    ensemble.main(["--members", *map(str, members), "--out", str(out), "--rule", "soft_vote",
                   "--folds", "3"])  # fmt: skip
    scored = predict_probabilities(load_module(out), val_images.images).double().numpy()
    mean = member_probabilities(members, val_images.names).mean(1)
    assert np.allclose(scored, mean, atol=1e-5)


def test_evaluate_and_predict_take_the_ensemble(stacked, kermany_root, tmp_path, capsys):
    out, _ = stacked
    result = evaluate.main(["--ckpt", str(out), "--data.root", str(kermany_root)])
    assert result["n"] == 27 and 0 <= result["auroc"] <= 1
    image = write_image(tmp_path / "x.png", 120, (40, 40), fmt="PNG")
    rows = predict.main(["--ckpt", str(out), str(image), "--format", "json"])
    assert rows[0]["model"] == "ensemble" and 0 <= rows[0]["probability"] <= 1
    capsys.readouterr()


def test_the_exported_graph_scores_as_the_checkpoint(stacked, tmp_path, capsys):
    out, _ = stacked
    image = write_image(tmp_path / "x.png", 120, (40, 40), fmt="PNG")
    onnx = tmp_path / "e.onnx"
    export.main(["--ckpt", str(out), "--onnx", str(onnx)])
    rows = predict.main(["--ckpt", str(out), str(image), "--format", "json"])
    rows_onnx = predict.main(["--onnx", str(onnx), str(image), "--format", "json"])
    assert rows_onnx[0]["probability"] == pytest.approx(rows[0]["probability"], abs=1e-5)
    capsys.readouterr()


def test_grad_cam_of_an_ensemble_is_one_line_and_serving_without_it_works(
    stacked, tmp_path, capsys
):
    out, _ = stacked
    image = write_image(tmp_path / "x.png", 120, (40, 40), fmt="PNG")
    with pytest.raises(SystemExit) as exit:
        predict.main(["--ckpt", str(out), str(image), "--cam", str(tmp_path / "cam")])
    err = capsys.readouterr().err.strip()
    assert exit.value.code == 2 and len(err.splitlines()) == 1
    assert "Grad-CAM cannot explain an ensemble" in err
    predictor = Predictor.from_checkpoint(out)
    row = answer(predictor, image.read_bytes(), "x.png", cam=False)
    assert row["model"] == "ensemble" and row["heatmap_png"] is None
    # serve asks for a heatmap by default: an ensemble answers without one (the page says so)
    served = answer(predictor, image.read_bytes(), "x.png", cam=True)
    assert served["heatmap_png"] is None and served["probability"] == row["probability"]


def copy_run(checkpoint: Path, to: Path) -> Path:
    """A member's best.ckpt and predictions.csv in a run directory of their own."""
    (to / "checkpoints").mkdir(parents=True)
    shutil.copy(checkpoint, to / "checkpoints" / "best.ckpt")
    shutil.copy(checkpoint.parents[1] / "predictions.csv", to / "predictions.csv")
    return to / "checkpoints" / "best.ckpt"


def refused(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit:
        ensemble.main(list(argv))
    err = capsys.readouterr().err.strip()
    assert exit.value.code == 2 and len(err.splitlines()) == 1, err
    return err


def test_bad_members_are_one_line_exit_2_and_write_nothing(members, tmp_path, capsys):
    a, b = map(str, members)
    out = tmp_path / "out" / "e.ckpt"
    assert "at least 2" in refused(capsys, "--members", a, "--out", str(out))
    assert "given twice" in refused(capsys, "--members", a, a, "--out", str(out))
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    assert "junk.ckpt" in refused(capsys, "--members", a, str(junk), "--out", str(out))
    assert "does not exist" in refused(capsys, "--members", a, "nope.ckpt", "--out", str(out))

    bigger = copy_run(members[1], tmp_path / "bigger")
    recipe, state, _ = read_checkpoint(bigger)
    write_checkpoint(bigger, state, replace(recipe, image_size=48), 0)
    err = refused(capsys, "--members", a, str(bigger), "--out", str(out))
    assert "different sizes" in err and "48" in err

    headed = copy_run(members[1], tmp_path / "headed")  # as if trained with l2_softmax
    recipe, state, _ = read_checkpoint(headed)
    write_checkpoint(headed, state, replace(recipe, loss={"name": "l2_softmax"}), 0)
    err = refused(capsys, "--members", a, str(headed), "--out", str(out))
    assert "loss.name l2_softmax" in err

    other = copy_run(members[1], tmp_path / "other")
    table = other.parents[1] / "predictions.csv"
    text = table.read_text()
    first_val = next(line for line in text.splitlines() if line.startswith("val,"))
    # Another image in its place: as many validation rows, not the same images.
    table.write_text(text.replace(first_val, first_val.replace("val,", "val,renamed-", 1)))
    err = refused(capsys, "--members", a, str(other), "--out", str(out))
    assert "do not share their val images" in err

    lost = copy_run(members[1], tmp_path / "lost")
    (lost.parents[1] / "predictions.csv").unlink()
    err = refused(capsys, "--members", a, str(lost), "--out", str(out))
    assert "predictions.csv not found" in err
    assert "--folds 99" in refused(capsys, "--members", a, b, "--out", str(out), "--folds", "99")
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_an_out_that_would_overwrite_what_a_member_holds_is_refused(members, tmp_path, capsys):
    a, b = map(str, members)
    run = members[0].parents[1]
    summary = (run / "summary.json").read_bytes()
    # e.ckpt's report would be the member's summary.json; a hard link is the checkpoint itself.
    err = refused(capsys, "--members", a, b, "--out", str(run / "summary.ckpt"))
    assert "would overwrite" in err and "summary.json" in err
    linked = tmp_path / "linked.ckpt"
    os.link(members[1], linked)
    assert "would overwrite" in refused(capsys, "--members", a, b, "--out", str(linked))
    assert (run / "summary.json").read_bytes() == summary


HEADER = "split,image,patient,positive,probability\n"


@pytest.mark.parametrize(
    ("table", "says"),
    [
        ((HEADER + "val,café.png,p1,0,0.5\n").encode("latin-1"), "is not UTF-8 text"),
        ((HEADER + f"val,{'a' * 200_000}.png,p1,0,0.5\n").encode(), "line 2: field larger"),
    ],
    ids=["latin-1", "200 KB field"],
)
def test_a_predictions_csv_no_run_writes_is_one_line_naming_it(
    table, says, tiny_checkpoint, tmp_path, capsys
):
    """No training: conftest's tiny checkpoint in two run folders, one table unreadable."""
    members = []
    for name, text in (("bad", table), ("good", (HEADER + "val,a.png,p1,0,0.5\n").encode())):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        members.append(shutil.copy(tiny_checkpoint, tmp_path / name / "checkpoints"))
        (tmp_path / name / "predictions.csv").write_bytes(text)
    out = tmp_path / "e.ckpt"
    err = refused(capsys, "--members", *map(str, members), "--out", str(out))
    assert f"{tmp_path / 'bad' / 'predictions.csv'}" in err and says in err
    assert "give members whose run folder is intact" in err and not out.exists()
