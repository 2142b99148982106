"""The DP-SGD regime's options (privacy.*): augmentation multiplicity and class weights by
hand on a linear model, logical batches against one physical batch, and their refusals."""

import json

import pytest
import torch
from test_privacy import FEDERATED, PRIVATE, TINY
from torch import nn

from pneumonia import fit
from pneumonia.data.datamodule import ChestXrayDataModule, PoissonBatches
from pneumonia.data.imageset import ImageSet
from pneumonia.training.privacy import DPSGD, PrivacyConfig


def private_step(x: torch.Tensor, labels: torch.Tensor, clip: float, **options) -> torch.Tensor:
    """One noiseless DP-SGD step (lr 1) of f(x) = w . x from w = 0, loss the mean of f over the
    rows of x: each row's own gradient is the row. The expected batch is the number of images
    (rows / augment_multiplicity)."""
    model = nn.Linear(x.shape[1], 1, bias=False)
    nn.init.zeros_(model.weight)
    cfg = PrivacyConfig(enabled=True, noise_multiplier=0.0, max_grad_norm=clip, **options)
    images = len(x) // cfg.augment_multiplicity
    dp = DPSGD(model, cfg, images=10_000, batch_size=images, planned_steps=1)
    optimizer = dp.wrap(torch.optim.SGD(model.parameters(), lr=1.0))
    dp.before_backward(labels)
    model(x).sum().div(len(x)).backward()
    optimizer.step()
    return model.weight.detach()[0]


# Two images, three augmented copies each (rows 0-2 and 3-5).
COPIES = torch.tensor([[3.0, 0.0], [0.0, 3.0], [3.0, 3.0], [0.0, 4.0], [0.0, 8.0], [0.0, 0.0]])
LABELS = torch.tensor([0, 0, 0, 1, 1, 1])


def test_augment_multiplicity_clips_the_mean_of_each_images_copies_by_hand():
    # image 1: mean (2, 2), norm 2.83 -> clipped to 1: (0.707, 0.707)
    # image 2: mean (0, 4), norm 4 -> (0, 1); the step is minus their mean over B = 2
    step = private_step(COPIES, LABELS, clip=1.0, augment_multiplicity=3)
    r = 2**-0.5
    assert torch.allclose(step, -torch.tensor([r / 2, (r + 1) / 2]), atol=1e-5)
    # clipping each copy on its own (K = 1, six images) is a different step
    assert not torch.allclose(private_step(COPIES, LABELS, clip=1.0) * 3, step, atol=1e-3)


def test_class_weights_scale_each_clipped_gradient_and_never_exceed_one():
    x, labels = torch.tensor([[3.0, 0.0], [0.0, 4.0]]), torch.tensor([0, 1])
    # clipped to (1, 0) and (0, 1); weights (2, 1) / 2 = (1, 0.5); minus the mean over B = 2
    step = private_step(x, labels, clip=1.0, class_weights=[2.0, 1.0])
    assert torch.allclose(step, torch.tensor([-0.5, -0.25]), atol=1e-5)
    # weights act after clipping: a large clip norm leaves (3, 0) and (0, 4) unclipped
    step = private_step(x, labels, clip=100.0, class_weights=[1.0, 0.25])
    assert torch.allclose(step, torch.tensor([-1.5, -0.5]), atol=1e-5)


def test_multiplicity_serves_k_augmented_copies_of_each_image_in_a_row():
    images = torch.randint(0, 256, (6, 1, 32, 32), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    data = ImageSet(images, labels, [str(i) for i in range(6)], [f"{i}.png" for i in range(6)])
    dm = ChestXrayDataModule(data, None, batch_size=6, poisson=PoissonBatches(multiplicity=3))
    dm.trainer = type("T", (), {"training": True, "current_epoch": 0})()
    out, labels = dm.on_after_batch_transfer((images, data.labels), 0)
    assert (
        out.shape[0] == 18
        and labels.tolist() == [0] * 3 + [1] * 3 + [0] * 3 + [1] * 3 + [0] * 3 + [1] * 3
    )
    assert not torch.equal(out[0], out[1])  # each copy its own augmentation


def private_central(tmp_path, name, *extra):
    run_dir = tmp_path / name
    argv = [*TINY, *PRIVATE, "--federated.enabled", "false", "--trainer.max_epochs", "2"]
    argv += ["--privacy.noise_multiplier", "1", "--data.augment.enabled", "false", *extra]
    fit.main([*argv, "--run_dir", str(run_dir)])
    return run_dir


def test_logical_batches_in_chunks_give_the_epsilon_and_weights_of_one_physical_batch(tmp_path):
    whole = private_central(tmp_path, "whole")
    chunked = private_central(tmp_path, "chunked", "--privacy.physical_batch_size", "3")
    guarantee = [
        json.loads((d / "summary.json").read_text())["privacy"]["dp_sgd"] for d in (whole, chunked)
    ]
    assert guarantee[0] == guarantee[1] and guarantee[0]["steps"] > 2
    a, b = (
        torch.load(d / "checkpoints" / "last.ckpt", weights_only=True) for d in (whole, chunked)
    )
    for key, value in a["state_dict"].items():
        assert torch.allclose(value, b["state_dict"][key], atol=1e-5), key


def test_logical_batches_are_served_in_chunks_that_say_which_one_ends_the_step():
    images = torch.zeros(10, 1, 32, 32, dtype=torch.uint8)
    labels = torch.arange(10) % 2
    data = ImageSet(images, labels, [str(i) for i in range(10)], [f"{i}.png" for i in range(10)])
    dm = ChestXrayDataModule(data, None, batch_size=7, poisson=PoissonBatches(physical=3))
    chunks = [(len(batch[1]), bool(batch[2])) for batch in dm.train_dataloader()]
    steps = sum(ends for _, ends in chunks)
    assert steps == int(1 / 0.7)  # one optimizer step per Poisson batch, as the accountant counts
    assert all(n <= 3 for n, _ in chunks) and chunks[-1][1]
    # each step's chunks: all but the last full, the last ends it (an empty batch: one chunk)
    sizes, current = [], []
    for n, ends in chunks:
        current.append(n)
        if ends:
            sizes.append(current)
            current = []
    assert all(all(n == 3 for n in step[:-1]) for step in sizes)


def test_a_federation_in_chunks_spends_and_trains_as_with_whole_batches(tmp_path):
    summaries = []
    for name, extra in (("whole", []), ("chunked", ["--privacy.physical_batch_size", "3"])):
        argv = [*FEDERATED, "--data.augment.enabled", "false", *extra]
        summaries.append(fit.main([*argv, "--run_dir", str(tmp_path / name)]))
    assert summaries[0]["privacy"] == summaries[1]["privacy"]
    assert summaries[0]["val"]["loss"] == pytest.approx(summaries[1]["val"]["loss"], abs=1e-5)
