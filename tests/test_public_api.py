"""The public API (`pneumonia.__all__`): a tiny federated fit and a prediction through it only,
as a notebook would use it."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

import pneumonia

TINY = {
    "model.name": "resnet18",
    "model.width": 16,
    "data.image_size": 32,
    "data.synthetic.n_patients": 40,
    "federated.rounds": 1,
    "federated.local_epochs": 1,
    "figures_every": 0,
    "trainer.enable_progress_bar": False,
}


def test_every_public_name_resolves_and_nothing_else_is_offered():
    assert all(callable(getattr(pneumonia, name)) for name in pneumonia.__all__)
    with pytest.raises(AttributeError, match="no attribute 'optimizers'"):
        pneumonia.optimizers  # noqa: B018  (internal modules are not attributes)


def test_importing_the_package_loads_no_torch():
    code = "import sys, pneumonia; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr


def test_a_fit_and_a_prediction_through_the_public_api(tmp_path):
    summary = pneumonia.train(None, TINY, run_dir=tmp_path / "run")
    assert summary["federated"]["rounds"] == 1 and 0 <= summary["val"]["accuracy"] <= 1
    model = pneumonia.load_checkpoint(summary["run_dir"])
    image = tmp_path / "xray.png"
    Image.linear_gradient("L").resize((40, 48)).save(image)
    (tmp_path / "notes.txt").write_text("not an image")
    rows, skipped = pneumonia.predict_files(model, [image, tmp_path / "notes.txt"])
    assert [r["path"] for r in rows] == [str(image)] and len(skipped) == 1
    assert 0 <= rows[0]["probability"] <= 1
    assert rows[0]["decision"] in ("NORMAL", "PNEUMONIA")
    # the same model from the checkpoint path, at another threshold
    again, _ = pneumonia.predict_files(pneumonia.load_checkpoint(summary["run_dir"], 0.0), [image])
    assert again[0]["probability"] == rows[0]["probability"]
    assert again[0]["decision"] == "PNEUMONIA"


def test_create_model_by_name_and_its_errors():
    net = pneumonia.create_model("resnet18", width=16, image_size=32)
    assert net(__import__("torch").zeros(2, 1, 32, 32)).shape == (2, 2)
    assert "se_resnet18" in pneumonia.list_models()
    with pytest.raises(pneumonia.UserError, match="unknown model option 'widht'"):
        pneumonia.create_model("resnet18", widht=16)
    with pytest.raises(pneumonia.UserError, match="unknown model.name"):
        pneumonia.create_model("resnet19")


def test_bad_overrides_are_one_user_error(tmp_path):
    with pytest.raises(pneumonia.UserError, match="federated.rounds"):
        pneumonia.train(None, {**TINY, "federated.rounds": 0}, run_dir=tmp_path / "r")
