"""The recipe (config + data statistics -> hyper-parameters) and the checkpoint that carries it."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pneumonia.core.errors import UserError
from pneumonia.data.imageset import ImageSet
from pneumonia.training.checkpoint import (
    load_module,
    read_checkpoint,
    set_threshold,
    write_checkpoint,
)
from pneumonia.training.recipe import Recipe, build_module, loss_weights, normalisation

MODEL = {"name": "resnet18", "norm": "gn", "gn_groups": 16, "se_reduction": 16, "width": 16,
         "drop_rate": 0.0, "pretrained": None}  # fmt: skip
RECIPE = Recipe(model=MODEL, optim={"lr": 0.002}, image_size=32, mean=0.4, std=0.2)


def images(values: list[int], labels: list[int]) -> ImageSet:
    pixels = torch.tensor(values, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 2, 2)
    n = len(values)
    return ImageSet(pixels.clone(), torch.tensor(labels), [f"p{i}" for i in range(n)],
                    [f"i{i}" for i in range(n)])  # fmt: skip


def test_agreed_normalisation_equals_the_pooled_images_by_hand():
    # Pixels 0 and 255 (client a), 255 (client b): in [0, 1] that is 0, 1, 1 with 4 pixels
    # per image: mean 2/3, variance 2/3 - 4/9 = 2/9, std 0.4714.
    a, b = images([0, 255], [0, 1]), images([255], [1])
    assert normalisation([a.pixel_moments(), b.pixel_moments()]) == (0.6667, 0.4714)
    assert normalisation([a.pixel_moments()]) == (0.5, 0.5)


def test_loss_weights_follow_data_balance():
    three_to_one = images([0, 0, 0, 0], [0, 1, 1, 1])
    # N / (K n_c): 4 / (2 * 1) = 2 and 4 / (2 * 3) = 2/3
    assert loss_weights("loss_weights", three_to_one) == pytest.approx([2.0, 2 / 3])
    assert loss_weights("sampler", three_to_one) is None


def test_the_checkpoint_carries_the_recipe_and_its_threshold(tmp_path):
    module = build_module(RECIPE, class_weights=[2.0, 0.5])
    path = tmp_path / "best.ckpt"
    write_checkpoint(path, module.state_dict(), RECIPE, round_number=3)
    recipe, state, ckpt = read_checkpoint(path)
    assert recipe == RECIPE and ckpt["epoch"] == ckpt["round"] == 3
    assert "class_weights" not in ckpt["hyper_parameters"]  # a trainer's, not the model's
    set_threshold(path, ckpt, 0.3)
    assert load_module(path).hparams.threshold == 0.3
    assert load_module(path, threshold=0.7).hparams.threshold == 0.7
    loaded = load_module(path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())


def test_a_checkpoint_of_another_model_is_one_line(tmp_path):
    path = tmp_path / "x.ckpt"
    write_checkpoint(path, {"model.fc.weight": torch.zeros(1)}, RECIPE, 1)
    with pytest.raises(UserError, match="does not match model 'resnet18'"):
        load_module(path)
    torch.save({"state_dict": {}}, tmp_path / "y.ckpt")
    with pytest.raises(UserError, match="not a checkpoint written by pneumonia.fit"):
        read_checkpoint(tmp_path / "y.ckpt")


RANGE = "is outside the range a run may have"
WIDTH = "(an integer > 0 and <= 512)"


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"model": MODEL | {"width": 65536}}, f"model.width 65536 {RANGE} {WIDTH}"),
        ({"model": MODEL | {"width": "64"}}, f"model.width '64' {RANGE} {WIDTH}"),
        ({"model": MODEL | {"maxout_pieces": 10**6}}, f"model.maxout_pieces 1000000 {RANGE}"),
        ({"image_size": 60000}, f"image_size 60000 {RANGE} (an integer >= 16 and <= 2048)"),
        ({"optim": {"decay": {"warmup": -1}}}, f"optim.decay.warmup -1 {RANGE} (an integer >= 0)"),
        ({"loss": {"angular_margin": 0}}, f"loss.angular_margin 0 {RANGE} (an integer > 0)"),
    ],
    ids=["width", "width as text", "maxout pieces", "image size", "optim", "loss"],
)  # fmt: skip
def test_a_recipe_outside_the_config_ranges_is_one_line_naming_field_value_and_range(
    change, says, tmp_path
):
    """Read back, before any module is built: the file's sizes never reach a builder."""
    path = tmp_path / "x.ckpt"
    write_checkpoint(path, {"model.fc.weight": torch.zeros(1)}, replace(RECIPE, **change), 1)
    with pytest.raises(UserError) as err:
        read_checkpoint(path)
    assert str(err.value).startswith(f"checkpoint {path}: {says}")
    assert "\n" not in str(err.value)
