"""data.intensity end to end: a checkpoint that standardises what it predicts on as training
did (predict, serve, evaluate, ONNX metadata), ensembles that must agree, old checkpoints read
as none, the parser's refusal, and the site profiles applied before the standardisation."""

import contextlib
import io
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from pneumonia import evaluate, export, fit
from pneumonia.core.errors import UserError
from pneumonia.data.cache import load_or_decode
from pneumonia.data.decode import square
from pneumonia.data.intensity import standardize
from pneumonia.data.kermany import list_image_files
from pneumonia.data.shifts import ShiftConfig, shifted
from pneumonia.data.sources import load_splits
from pneumonia.federated.cohort import LocalCohort
from pneumonia.inference.onnx_model import METADATA_KEYS, OnnxPredictor, _model
from pneumonia.inference.predictor import Predictor, predict_files
from pneumonia.run.config import parse_fit_config
from pneumonia.run.sites import with_sites
from pneumonia.run.stacking import check_members
from pneumonia.serve.app import answer
from pneumonia.training.checkpoint import load_module, read_checkpoint, write_checkpoint

TINY = [
    "--figures_every", "0",  # TensorBoard figures: the reported model's only
    "--data.image_size", "32",
    "--data.synthetic.n_patients", "40",
    "--model.width", "16",
    "--trainer.max_epochs", "1",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
    "--threshold", "0.5",
]  # fmt: skip


@pytest.fixture(scope="module")
def clahe_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("intensity") / "run"
    summary = fit.main([*TINY, "--data.intensity", "clahe", "--run_dir", str(run_dir)])
    return summary, run_dir


def test_the_checkpoint_remembers_the_standardisation(clahe_run):
    _, run_dir = clahe_run
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    recipe, _, _ = read_checkpoint(ckpt)
    assert recipe.intensity == "clahe"
    assert load_module(ckpt).hparams["intensity"] == "clahe"
    assert "intensity: clahe" in (run_dir / "config.yaml").read_text()


def test_predict_and_serve_standardise_what_they_score(clahe_run, radiograph, tmp_path):
    _, run_dir = clahe_run
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    predictor = Predictor.from_checkpoint(ckpt)
    assert predictor.model.intensity == "clahe"
    image, _ = radiograph
    path = tmp_path / "film.png"
    Image.fromarray(image[0].numpy()).save(path)
    (row,), _ = predict_files(predictor, [path])
    module = load_module(ckpt)
    seen = standardize(square(image, 32), "clahe")[None]
    with torch.no_grad():
        logits = module(seen.float() / 255.0)
        plain = module(square(image, 32)[None].float() / 255.0)
    assert not torch.allclose(logits, plain, atol=1e-4)  # the standardisation matters here
    assert row["probability"] == pytest.approx(float(module.positive_probability(logits)[0]),
                                               abs=1e-5)  # fmt: skip
    served = answer(predictor, path.read_bytes(), "film.png", cam=False)
    assert served["probability"] == pytest.approx(row["probability"], abs=1e-6)


def test_evaluate_standardises_and_shifts_before_it(clahe_run, kermany_root, tmp_path,
                                                    monkeypatch):  # fmt: skip
    _, run_dir = clahe_run
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    cache_dir = tmp_path / "cache"
    scored = []
    real = evaluate.scored

    def spy(module, images, args, progress=False):
        scored.append(images)
        return real(module, images, args, progress)

    monkeypatch.setattr(evaluate, "scored", spy)
    result = evaluate.main(["--ckpt", str(ckpt), "--data.root", str(kermany_root),
                            "--data.cache_dir", str(cache_dir), "--shift", "true"])  # fmt: skip
    clean, shift = scored
    raw = load_or_decode(list_image_files(kermany_root), 32, cache_dir)
    assert clean.names == raw.names and torch.equal(clean.images, standardize(raw.images, "clahe"))
    assert torch.equal(shift.images, shifted(raw, ShiftConfig(), "clahe").images)
    assert not torch.equal(shift.images, shifted(clean, ShiftConfig()).images)
    assert result["shift"]["n"] == result["n"] == len(raw)


def test_ensemble_members_must_standardise_alike(clahe_run, tmp_path):
    _, run_dir = clahe_run
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    ckpt = other / "checkpoints" / "best.ckpt"
    recipe, state, _ = read_checkpoint(ckpt)
    write_checkpoint(ckpt, state, replace(recipe, intensity="none"), 0)
    with pytest.raises(UserError, match="differently standardised images") as err:
        check_members([str(run_dir / "checkpoints" / "best.ckpt"), str(ckpt)])
    assert "data.intensity" in str(err.value) and "\n" not in str(err.value)


def test_onnx_carries_the_standardisation_and_applies_it(clahe_run, radiograph, tmp_path):
    _, run_dir = clahe_run
    ckpt, out = run_dir / "checkpoints" / "best.ckpt", tmp_path / "model.onnx"
    with contextlib.redirect_stdout(io.StringIO()):
        metadata = export.main(["--ckpt", str(ckpt), "--onnx", str(out)])
    assert metadata["intensity"] == "clahe" and "CLAHE" in metadata["preprocessing"]
    onnx = OnnxPredictor(out)
    assert onnx.model == Predictor.from_checkpoint(ckpt).model
    image, _ = radiograph
    path = tmp_path / "film.png"
    Image.fromarray(image[0].numpy()).save(path)
    (row,), _ = predict_files(onnx, [path])
    (torch_row,), _ = predict_files(Predictor.from_checkpoint(ckpt), [path])
    assert row["probability"] == pytest.approx(torch_row["probability"], abs=1e-4)


def test_old_checkpoints_and_exports_read_as_none():
    old = Path(__file__).parent / "fixtures" / "binary_resnet18_bn_before_issue19.ckpt"
    assert Predictor.from_checkpoint(old).model.intensity == "none"
    assert load_module(old).hparams["intensity"] == "none"
    metadata = {key: "" for key in METADATA_KEYS} | {
        "image_size": "32", "threshold": "0.5", "classes": '["NORMAL", "PNEUMONIA"]',
        "positive_class": "PNEUMONIA", "model_card": "{}",
    }  # fmt: skip
    assert _model(metadata, "old.onnx", None).intensity == "none"
    assert _model(metadata | {"intensity": "clahe"}, "m.onnx", None).intensity == "clahe"
    with pytest.raises(UserError, match="intensity"):
        _model(metadata | {"intensity": "sharpen"}, "m.onnx", None)


def test_an_unknown_intensity_exits_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as stopped:
        fit.main(["--data.intensity", "sharpen"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0
    assert "data.intensity 'sharpen' is not one of:" in err and "clahe" in err


def test_site_profiles_reimage_before_the_standardisation():
    federated = [*TINY, "--federated.enabled", "true", "--federated.local_epochs", "1",
                 "--federated.partition", "sites_shift"]  # fmt: skip

    def sites(argv):
        cfg, _, _ = parse_fit_config(argv)
        splits = load_splits(cfg.data, cfg.seed)
        cohort = LocalCohort(cfg, splits, {})
        return with_sites(splits, cfg, cohort), cohort

    plain, plain_cohort = sites(federated)
    eq, eq_cohort = sites([*federated, "--data.intensity", "equalize"])
    for ours, theirs in zip(eq_cohort.site_data, plain_cohort.site_data, strict=True):
        assert ours.names == theirs.names
        assert torch.equal(ours.images, standardize(theirs.images, "equalize"))
    assert torch.equal(eq.val_site, plain.val_site) and (eq.val_site >= 0).all()
    assert torch.equal(eq.val.images, standardize(plain.val.images, "equalize"))
    assert eq.raw_train is None and eq.raw_val is None  # served, and let go
