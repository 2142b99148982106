"""data.roi lungs end to end: training on lung-field crops, a checkpoint that crops what it
predicts on the same way, the mask panel in TensorBoard, and the CAM-energy share."""

import math

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pneumonia import fit
from pneumonia.data.decode import prepare
from pneumonia.inference.explain import lung_energy_share
from pneumonia.inference.predictor import Predictor, predict_files
from pneumonia.training.checkpoint import load_module

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
def lungs_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("roi") / "run"
    summary = fit.main([*TINY, "--data.roi", "lungs", "--run_dir", str(run_dir)])
    return summary, run_dir


def test_a_lung_field_checkpoint_crops_what_it_predicts_on(lungs_run, radiograph, tmp_path):
    _, run_dir = lungs_run
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    predictor = Predictor.from_checkpoint(ckpt)
    assert predictor.model.roi == "lungs"
    image, _ = radiograph
    path = tmp_path / "film.png"
    Image.fromarray(image[0].numpy()).save(path)
    (row,), _ = predict_files(predictor, [path])
    module = load_module(ckpt)
    seen, found = prepare(image, 32, "lungs")
    assert found
    with torch.no_grad():
        p = float(module.positive_probability(module(seen[None].float() / 255.0))[0])
    assert row["probability"] == pytest.approx(p, abs=1e-5)


def test_the_mask_panel_is_in_tensorboard(lungs_run):
    _, run_dir = lungs_run
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0}).Reload()
    assert "data/lung_masks" in events.Tags()["images"]


def test_cam_energy_shares_are_shares_and_nan_without_lungs(lungs_run, radiograph, tiny_checkpoint):
    _, run_dir = lungs_run
    image, _ = radiograph
    for module, roi in ((load_module(run_dir / "checkpoints" / "best.ckpt"), "lungs"),
                        (load_module(tiny_checkpoint), "full")):  # fmt: skip
        share = lung_energy_share(module, image, roi)
        assert 0.0 <= share <= 1.0 or math.isnan(share)  # nan: an all-zero heat map
    blank = torch.full((1, 64, 64), 128, dtype=torch.uint8)
    assert math.isnan(lung_energy_share(load_module(tiny_checkpoint), blank, "full"))
