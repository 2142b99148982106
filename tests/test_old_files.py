"""Files written by an older layout of the package still work: a centralized run's best.ckpt, a
stacking ensemble, an ONNX export and a federated run killed in round 2
(tests/fixtures/old_runs, made by commit eaa17e0 with its make.py). They load, evaluate,
predict and serve as the old code did (expected.json holds its answers), and the federated run
resumes to the weights a run of today's code reaches without the kill."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from pneumonia import evaluate, fit, predict
from pneumonia.inference.predictor import Predictor
from pneumonia.serve.app import create_app

OLD = Path(__file__).parent / "fixtures" / "old_runs"
EXPECTED = json.loads((OLD / "expected.json").read_text())
IMAGES = sorted((OLD / "images").rglob("*.*"))
SOURCES = {
    "central": ["--ckpt", str(OLD / "central_a" / "checkpoints" / "best.ckpt")],
    "stacking": ["--ckpt", str(OLD / "stacking.ckpt")],
    "onnx": ["--onnx", str(OLD / "central_a.onnx")],
}


def by_name(rows: list[dict]) -> dict[str, float]:
    return {Path(r["path"]).name: r["probability"] for r in rows}


def test_the_fixtures_are_all_there():
    assert len(IMAGES) == 8 and set(EXPECTED["predict"]) == set(SOURCES)


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_old_models_predict_what_they_predicted(name):
    rows = predict.main([*SOURCES[name], *map(str, IMAGES), "--format", "json"])
    now, then = by_name(rows), by_name(EXPECTED["predict"][name])
    assert now.keys() == then.keys()
    assert all(abs(now[k] - then[k]) < 1e-6 for k in now), (now, then)
    assert [r["decision"] for r in rows] == [r["decision"] for r in EXPECTED["predict"][name]]


@pytest.mark.parametrize("name", ["central", "stacking"])
def test_old_checkpoints_evaluate_to_the_same_figures(name):
    figures = evaluate.main([*SOURCES[name], "--data.root", str(OLD / "images")])
    then = EXPECTED["evaluate"][name]
    for key in ("accuracy", "recall", "specificity", "auroc", "loss", "n"):
        assert figures[key] == pytest.approx(then[key], abs=1e-6, nan_ok=True), key
    assert figures["ci95"] == then["ci95"]  # rounded to 4 digits: the same, or not


@pytest.mark.parametrize("name", ["central", "stacking"])
def test_old_checkpoints_serve_the_same_answer(name):
    predictor = Predictor.from_checkpoint(SOURCES[name][1])
    expected = by_name(EXPECTED["predict"][name])
    with TestClient(create_app(predictor)) as client:
        for path in IMAGES[:2]:
            answer = client.post("/predict", files={"file": (path.name, path.read_bytes())})
            assert answer.status_code == 200, answer.text
            assert abs(answer.json()["probability"] - expected[path.name]) < 1e-6


def last_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def test_an_old_federated_run_resumes_to_the_weights_of_one_never_stopped(tmp_path):
    killed = tmp_path / "killed"
    shutil.copytree(OLD / "federated", killed)
    assert (killed / "rounds.csv").read_text().count("\n") == 2  # header + round 1
    summary = fit.main(["--resume", str(killed)])
    assert summary["federated"]["rounds"] == 3
    assert (killed / "rounds.csv").read_text().count("\n") == 4
    fresh = tmp_path / "fresh"
    fit.main(["--config", str(OLD / "federated" / "config.yaml"), "--run_dir", str(fresh)])
    old, new = last_weights(killed), last_weights(fresh)
    assert old.keys() == new.keys()
    assert all(torch.allclose(old[k].float(), new[k].float(), atol=1e-6) for k in old)
