from types import SimpleNamespace

import pytest
import torch

from pneumonia.data.datamodule import ChestXrayDataModule, class_balanced_weights
from pneumonia.data.imageset import ImageSet
from pneumonia.data.transforms import AugmentConfig


def make_imageset(n_normal: int, n_pneumonia: int, size: int = 8) -> ImageSet:
    n = n_normal + n_pneumonia
    g = torch.Generator().manual_seed(0)
    return ImageSet(
        images=torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=g),
        labels=torch.tensor([0] * n_normal + [1] * n_pneumonia),
        patients=[f"p{i}" for i in range(n)],
        names=[f"{i}.jpeg" for i in range(n)],
    )


def test_class_balanced_weights_hand_computed():
    # N / (K * n_c): 4 / (2 * 1) = 2, 4 / (2 * 3) = 2/3
    assert class_balanced_weights(torch.tensor([0, 1, 1, 1]), 2) == pytest.approx([2.0, 2 / 3])
    assert class_balanced_weights(torch.tensor([0, 0, 1, 1]), 2) == pytest.approx([1.0, 1.0])


def labels_drawn(dm: ChestXrayDataModule) -> torch.Tensor:
    return torch.cat([labels for _, labels in dm.train_dataloader()])


def test_balanced_sampling_draws_classes_about_equally():
    imageset = make_imageset(100, 900)
    dm = ChestXrayDataModule(imageset, imageset, batch_size=100, balanced_sampling=True, seed=0)
    drawn = labels_drawn(dm)
    assert len(drawn) == 1000
    assert 0.45 < (drawn == 0).float().mean() < 0.55


def test_without_balanced_sampling_each_image_once_per_epoch():
    imageset = make_imageset(100, 900)
    dm = ChestXrayDataModule(imageset, imageset, batch_size=100, balanced_sampling=False, seed=0)
    drawn = labels_drawn(dm)
    assert (drawn == 0).sum() == 100 and len(drawn) == 1000


def test_same_seed_same_batches():
    imageset = make_imageset(30, 30)
    first = [ChestXrayDataModule(imageset, imageset, batch_size=60, seed=s) for s in (3, 3, 4)]
    drawn = [next(iter(dm.train_dataloader()))[0] for dm in first]
    assert torch.equal(drawn[0], drawn[1])
    assert not torch.equal(drawn[0], drawn[2])


def test_last_batch_of_one_is_dropped_in_training_only():
    imageset = make_imageset(4, 5)  # 9 images, batches of 4: 4 + 4 + 1
    dm = ChestXrayDataModule(imageset, imageset, batch_size=4, eval_batch_size=4)
    assert [len(b[1]) for b in dm.train_dataloader()] == [4, 4]
    assert [len(b[1]) for b in dm.val_dataloader()] == [4, 4, 1]
    assert dm.test_dataloader() == []


def test_train_batches_are_uint8_and_become_floats_in_training():
    imageset = make_imageset(8, 8)
    identity = AugmentConfig(rotation=0.0, translate=0.0, scale_min=1.0, scale_max=1.0)
    dm = ChestXrayDataModule(imageset, imageset, batch_size=16, augment=identity)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (16, 1, 8, 8)

    dm.trainer = SimpleNamespace(training=True)
    out, out_labels = dm.on_after_batch_transfer((images, labels), 0)
    assert out.dtype == torch.float32 and out.shape == images.shape
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert torch.allclose(out, images.float() / 255.0, atol=1e-5)
    assert torch.equal(out_labels, labels)

    dm.trainer = SimpleNamespace(training=False)
    out, _ = dm.on_after_batch_transfer((images, labels), 0)
    assert out.dtype == torch.uint8 and torch.equal(out, images)


def test_no_trainer_leaves_batch_uint8():
    imageset = make_imageset(2, 2)
    dm = ChestXrayDataModule(imageset, imageset, batch_size=4)
    images = imageset.images
    out, _ = dm.on_after_batch_transfer((images, imageset.labels), 0)
    assert out.dtype == torch.uint8
