"""Grad-CAM (captum) and the pictures made of it."""

from __future__ import annotations

import matplotlib
import pytest
import torch
from conftest import TINY_MODEL
from torch import nn

from pneumonia.data.imageset import ImageSet
from pneumonia.inference.explain import (
    ALPHA,
    COLORMAP,
    _unit_scaled,
    heatmaps,
    overlay,
    seeded_panel,
    target_layer,
)
from pneumonia.inference.scoring import predict_probabilities
from pneumonia.training.recipe import Recipe, build_module


def module(name: str = "se_resnet18", size: int = 64):
    torch.manual_seed(0)
    width = TINY_MODEL["width"] if "resnet" in name else 64
    return build_module(Recipe(model=TINY_MODEL | {"name": name, "width": width}, optim={},
                               image_size=size))  # fmt: skip


@pytest.mark.parametrize("name", ["se_resnet18", "resnet18"])
def test_the_resnets_are_read_at_their_last_residual_stage(name):
    model = module(name).model
    assert target_layer(model) is model.layer4


@pytest.mark.parametrize(("size", "stage"), [(64, "layer2"), (128, "layer3"), (224, "layer4")])
def test_the_resnets_are_read_where_the_grid_is_at_least_7_cells(size, stage):
    """At 64 px the last stage is 2 x 2 cells: a heatmap that can only name a quadrant."""
    model = module("se_resnet18", size).model
    assert target_layer(model, size) is getattr(model, stage)
    maps, _ = heatmaps(module("se_resnet18", size), torch.randint(0, 256, (1, 1, size, size),
                                                                 dtype=torch.uint8))  # fmt: skip
    assert maps.shape == (1, size, size)


@pytest.mark.parametrize("name", ["alexnet", "vgg16"])
def test_other_models_are_read_at_their_last_convolution(name):
    model = module(name).model
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert target_layer(model) is convs[-1]


def test_heatmaps_are_per_image_unit_maps_beside_the_models_probabilities():
    m = module(size=64)
    images = torch.randint(0, 256, (5, 1, 64, 64), dtype=torch.uint8)
    maps, probs = heatmaps(m, images, batch_size=2)
    assert maps.shape == (5, 64, 64) and maps.min() >= 0
    peaks = maps.flatten(1).amax(1)
    assert all(p == pytest.approx(1.0) or p == 0 for p in peaks.tolist())
    assert torch.allclose(probs, predict_probabilities(m, images), atol=1e-5)
    assert not m.training and torch.is_grad_enabled()


def test_unit_scaling_and_the_blend_by_hand():
    maps = torch.tensor([[[0.0, 2.0], [1.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]])
    assert _unit_scaled(maps).tolist() == [[[0.0, 0.5], [0.25, 1.0]], [[0.0, 0.0], [0.0, 0.0]]]
    image = torch.tensor([[[0, 255], [100, 200]]], dtype=torch.uint8)
    rgb = overlay(image, torch.zeros(2, 2))
    cold = matplotlib.colormaps[COLORMAP](0.0)[:3]
    expected = [round(((1 - ALPHA) * 100 / 255 + ALPHA * c) * 255) for c in cold]
    assert rgb.shape == (2, 2, 3) and rgb[1, 0].tolist() == expected


def test_the_panel_shows_the_same_images_every_time():
    m = module(size=32)
    n = 20
    images = ImageSet(torch.randint(0, 256, (n, 1, 32, 32), dtype=torch.uint8),
                      torch.arange(n) % 2, [f"p{i}" for i in range(n)],
                      [f"i{i}" for i in range(n)])  # fmt: skip
    titles = [[ax.get_title() for ax in seeded_panel(m, images).axes] for _ in range(2)]
    assert titles[0] == titles[1] and len(titles[0]) == 8
    assert all(t.startswith("true ") for t in titles[0])
