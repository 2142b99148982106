"""data.task three_class end to end: a tiny federated run, its report, and the tools that use
its checkpoint (evaluate, predict, serve, export); and binary checkpoints from before the
three-class task still load and score the same."""

import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from pneumonia import evaluate, fit, predict
from pneumonia.data.imageset import THREE_CLASSES
from pneumonia.inference.predictor import Predictor
from pneumonia.inference.scoring import predict_probabilities
from pneumonia.serve.app import create_app
from pneumonia.training.checkpoint import load_module

FIXTURES = Path(__file__).parent / "fixtures"
TINY_FED = [
    "--data.task", "three_class",
    "--data.image_size", "32",
    "--data.synthetic.n_patients", "60",
    "--data.batch_size", "16",
    "--model.name", "se_resnet18",
    "--model.width", "16",
    "--federated.enabled", "true",
    "--federated.rounds", "2",
    "--federated.local_epochs", "1",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("three") / "run"
    summary = fit.main([*TINY_FED, "--run_dir", str(run_dir)])
    return run_dir, summary


def test_a_tiny_three_class_federation_reports_per_class_figures(run):
    run_dir, summary = run
    classes = summary["val"]["classes"]
    for name in THREE_CLASSES:
        for metric in ("precision", "recall", "f1", "auroc"):
            value = classes[f"{metric}_{name}"]
            assert 0.0 <= value <= 1.0
            low, high = classes["ci95"][f"{metric}_{name}"]
            assert not low > high  # NaN where no replicate drew the class (tiny validation)
    matrix = classes["class_confusion_matrix"]
    assert len(matrix) == 3 and sum(map(sum, matrix)) == summary["val"]["n"]
    # The binary figures are of P(pneumonia) = P(BACTERIA) + P(VIRUS).
    header, *rows = (run_dir / "predictions.csv").read_text().splitlines()
    columns = header.split(",")
    assert columns[-4:] == ["class", "p_NORMAL", "p_BACTERIA", "p_VIRUS"]
    for line in rows[:5]:
        row = dict(zip(columns, line.split(","), strict=True))
        total = float(row["p_BACTERIA"]) + float(row["p_VIRUS"])
        assert float(row["probability"]) == pytest.approx(total, abs=1e-5)
        assert int(row["positive"]) == (row["class"] != "NORMAL")
    partition = (run_dir / "partition.csv").read_text().splitlines()[0]
    assert "BACTERIA" in partition and "VIRUS" in partition


def test_the_checkpoint_has_three_outputs_and_the_summary_sum(run):
    run_dir, _ = run
    module = load_module(run_dir / "checkpoints" / "best.ckpt")
    assert module.classes == THREE_CLASSES and module.positives == [1, 2]
    images = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8)
    logits = module.eval()(images)
    assert logits.shape == (4, 3)
    summed = logits.softmax(1)[:, 1:].sum(1)
    assert torch.allclose(predict_probabilities(module, images), summed, atol=1e-6)


def test_predict_gives_three_probabilities_and_their_pneumonia_sum(run, kermany_root, capsys):
    run_dir, _ = run
    rows = predict.main([str(kermany_root), "--ckpt", str(run_dir / "checkpoints" / "best.ckpt"),
                         "--format", "json"])  # fmt: skip
    capsys.readouterr()
    assert rows and list(rows[0])[:5] == [
        "path",
        "probability",
        "p_NORMAL",
        "p_BACTERIA",
        "p_VIRUS",
    ]
    for row in rows:
        assert row["probability"] == pytest.approx(row["p_BACTERIA"] + row["p_VIRUS"], abs=2e-6)
        assert row["p_NORMAL"] + row["p_BACTERIA"] + row["p_VIRUS"] == pytest.approx(1, abs=2e-6)
        if row["decision"] == "PNEUMONIA":
            assert row["cause"] == max(("BACTERIA", "VIRUS"), key=lambda c: row[f"p_{c}"])
        else:
            assert row["decision"] == "NORMAL" and row["cause"] == ""


def test_serve_answers_with_the_class_probabilities(run, kermany_root):
    run_dir, _ = run
    predictor = Predictor.from_checkpoint(run_dir / "checkpoints" / "best.ckpt")
    image = next((kermany_root / "PNEUMONIA").iterdir())
    with TestClient(create_app(predictor)) as client:
        response = client.post("/predict", files={"file": (image.name, image.read_bytes())})
        assert response.status_code == 200
        body = response.json()
        assert body["probability"] == pytest.approx(body["p_BACTERIA"] + body["p_VIRUS"], abs=2e-6)
        assert client.get("/model").json()["classes"] == list(THREE_CLASSES)
        bad = client.post("/predict", files={"file": ("x.jpeg", b"not an image")})
        assert bad.status_code in (415, 422)
        again = client.post("/predict", files={"file": (image.name, image.read_bytes())})
        assert again.status_code == 200


def test_evaluate_scores_three_classes_from_kermany_names(run, kermany_root, capsys):
    run_dir, _ = run
    ckpt = str(run_dir / "checkpoints" / "best.ckpt")
    evaluate.main(["--ckpt", ckpt, "--data.root", str(kermany_root)])
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 27 and sum(map(sum, result["classes"]["class_confusion_matrix"])) == 27
    assert "macro_f1" in result["classes"] and "macro_auroc" in result["classes"]["ci95"]


@pytest.mark.parametrize("name", ["se_resnet18_gn", "resnet18_bn"])
def test_binary_checkpoints_from_before_three_classes_load_and_score_the_same(name):
    """The files were written by the package at commit ad7c99a (before data.task), with the
    probabilities it gave on these seeded images."""
    expected = json.loads((FIXTURES / "binary_before_issue19.json").read_text())
    module = load_module(FIXTURES / f"binary_{name}_before_issue19.ckpt")
    assert module.classes == ("NORMAL", "PNEUMONIA") and module.positive == 1
    assert float(module.hparams.threshold) == 0.4
    g = torch.Generator().manual_seed(expected["seed"])
    images = torch.randint(0, 256, tuple(expected["shape"]), generator=g, dtype=torch.uint8)
    probs = predict_probabilities(module, images)
    assert torch.allclose(probs, torch.tensor(expected["probabilities"][name]), atol=1e-6)
