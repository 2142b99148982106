"""`predict --cam`'s picture (`explain.cam_figure`): the overlay at the radiograph's own pixels,
titled with the file and its decision, beside a colour bar of what the colours mean."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from conftest import run_predict, write_image
from PIL import Image

from pneumonia.inference import explain, predictor
from pneumonia.inference.explain import cam_caption, cam_figure, figure_png, overlay

ROW = {"probability": 0.8234, "decision": "PNEUMONIA", "threshold": 0.5}


def test_the_caption_says_the_decision_its_probability_and_the_class_explained():
    assert cam_caption(ROW, "PNEUMONIA") == (
        "predicted PNEUMONIA: P(PNEUMONIA) 0.82 > threshold 0.50",
        "PNEUMONIA",
    )
    normal = ROW | {"probability": 0.1, "decision": "NORMAL"}
    assert cam_caption(normal, "PNEUMONIA") == (
        "predicted NORMAL: P(PNEUMONIA) 0.10 <= threshold 0.50",
        "NORMAL",
    )
    three = ROW | {"p_NORMAL": 0.18, "p_BACTERIA": 0.61, "p_VIRUS": 0.21, "cause": "BACTERIA"}
    line, explained = cam_caption(three, "PNEUMONIA")
    assert line.endswith("> threshold 0.50, likelier cause BACTERIA (P 0.61)")
    assert explained == "BACTERIA"  # what Grad-CAM explains then (`explain.decided_class`)


@pytest.mark.parametrize(("height", "width", "times"), [(600, 500, 1), (40, 60, 8)])
def test_the_figure_keeps_the_overlays_pixels_under_a_title_beside_a_colour_bar(
    height, width, times
):
    image = torch.randint(0, 256, (1, height, width), dtype=torch.uint8)
    heat = torch.linspace(0, 1, 64 * 64).reshape(64, 64)
    figure = cam_figure(image, heat, "x.png\npredicted NORMAL", "NORMAL")
    (bar,) = [ax for ax in figure.axes if ax.get_ylabel()]
    assert bar.get_ylabel().startswith("Grad-CAM relevance for NORMAL\n(0: none, 1:")
    assert bar.get_ylim() == (0.0, 1.0)
    assert [t.get_text() for t in figure.texts] == ["x.png\npredicted NORMAL"]
    picture = np.asarray(Image.open(io.BytesIO(figure_png(figure))).convert("RGB"))
    expected = overlay(image, heat).repeat(times, 0).repeat(times, 1)  # small ones enlarged
    h, w = expected.shape[:2]
    assert picture.shape[0] > h and picture.shape[1] > w  # the title above, the bar beside
    assert np.array_equal(picture[-h:, :w], expected)  # bottom left, pixel for pixel


def test_predict_cam_titles_each_overlay_with_its_file_and_row(
    tiny_checkpoint, tmp_path, capsys, monkeypatch
):
    folder = tmp_path / "in"
    write_image(folder / "a.png", 90, (50, 40), fmt="PNG")
    write_image(folder / "b.png", 190, (40, 50), fmt="PNG")
    drawn = []

    def spy(image, heat, title, explained):
        drawn.append((title, explained))
        return explain.cam_figure(image, heat, title, explained)

    monkeypatch.setattr(predictor, "cam_figure", spy)
    code, out, _ = run_predict(
        capsys, "--ckpt", str(tiny_checkpoint), str(folder), "--format", "jsonl",
        "--threshold", "0.001", "--cam", str(tmp_path / "cam"),
    )  # fmt: skip
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [title.splitlines()[0] for title, _ in drawn] == ["a.png", "b.png"]
    for (title, explained), row in zip(drawn, rows, strict=True):
        p = row["probability"]
        assert (
            title.splitlines()[1] == f"predicted PNEUMONIA: P(PNEUMONIA) {p:.2f} > threshold 0.00"
        )
        assert explained == "PNEUMONIA"
        assert Image.open(row["heatmap"]).size[0] > 40  # the figure, bar and all
