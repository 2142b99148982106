"""Progressive resizing: the schedule, the batches it shrinks, and the final side of a model."""

import pytest
import torch

from pneumonia import fit
from pneumonia.core.errors import UserError
from pneumonia.data.progressive import (
    ProgressiveConfig,
    check_progressive,
    resize_batch,
    size_at,
)
from pneumonia.training.checkpoint import read_checkpoint
from pneumonia.training.module import ClassifierModule

TINY = [
    "--figures_every", "0",
    "--data.image_size", "48",
    "--data.synthetic.n_patients", "24",
    "--data.batch_size", "16",
    "--data.progressive.start_size", "16",
    "--data.progressive.final_fraction", "0.5",
    "--model.name", "resnet18",
    "--model.width", "16",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]  # fmt: skip


def test_schedule_by_hand():
    # 64 -> 128 over 12 epochs, the last quarter at 128: the ramp ends at epoch 9; sides are
    # 64 + 64 e / 9 rounded down to 16 px.
    cfg = ProgressiveConfig(start_size=64, final_fraction=0.25)
    sides = [size_at(e, 12, cfg, 128) for e in range(12)]
    assert sides == [64, 64, 64, 80, 80, 96, 96, 112, 112, 128, 128, 128]


def test_off_is_the_final_side():
    assert {size_at(e, 5, ProgressiveConfig(), 96) for e in range(5)} == {96}


@pytest.mark.parametrize("start", [8, 64, 100])
def test_start_outside_the_range_is_refused(start):
    with pytest.raises(UserError, match="data.progressive.start_size"):
        check_progressive(ProgressiveConfig(start_size=start), 64)


def test_resize_keeps_range_and_dtype():
    images = torch.randint(0, 256, (3, 1, 64, 64), dtype=torch.uint8)
    out = resize_batch(images, 32)
    assert out.shape == (3, 1, 32, 32) and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    # Antialiased: a 2x reduction of a constant image stays that constant.
    flat = torch.full((1, 1, 64, 64), 200, dtype=torch.uint8)
    assert torch.allclose(resize_batch(flat, 32), torch.full((1, 1, 32, 32), 200 / 255))


@pytest.fixture
def sides_seen(monkeypatch):
    """(epoch of the Trainer, side) of every training batch the module sees."""
    seen: list[tuple[int, int]] = []
    original = ClassifierModule.training_step

    def spy(self, batch, batch_idx):
        seen.append((self.current_epoch, batch[0].shape[-1]))
        return original(self, batch, batch_idx)

    monkeypatch.setattr(ClassifierModule, "training_step", spy)
    return seen


def test_centralized_run_follows_the_schedule(tmp_path, sides_seen):
    run_dir = tmp_path / "run"
    fit.main([*TINY, "--federated.enabled", "false", "--trainer.max_epochs", "4",
              "--run_dir", str(run_dir)])  # fmt: skip
    by_epoch = {epoch: side for epoch, side in sides_seen}
    # 16 -> 48 over 4 epochs, the last half at 48: the ramp ends at epoch 2.
    assert by_epoch == {0: 16, 1: 32, 2: 48, 3: 48}
    assert len({(e, s) for e, s in sides_seen}) == 4  # one side per epoch
    recipe, _, _ = read_checkpoint(run_dir / "checkpoints" / "best.ckpt")
    assert recipe.image_size == 48  # what evaluate, predict, serve and ONNX resize to


def test_federated_run_follows_the_rounds(tmp_path, sides_seen):
    run_dir = tmp_path / "run"
    fit.main([*TINY, "--federated.enabled", "true", "--federated.clients", "3",
              "--federated.fraction", "0.34", "--federated.rounds", "4",
              "--federated.local_epochs", "1", "--run_dir", str(run_dir)])  # fmt: skip
    # One client of three a round: each kept Trainer counts only the epochs it trained, the
    # schedule counts the run's (rounds x local epochs). Sides in the order trained, once per
    # change: the ramp by round, never back to a smaller side.
    sides = [side for _, side in sides_seen]
    assert [s for i, s in enumerate(sides) if i == 0 or s != sides[i - 1]] == [16, 32, 48]
    recipe, _, _ = read_checkpoint(run_dir / "checkpoints" / "best.ckpt")
    assert recipe.image_size == 48


def test_a_late_client_takes_the_rounds_side(tmp_path):
    """A client's Trainer that trained fewer epochs (not sampled, or rebuilt on resume) still
    trains at the side of the run's round."""
    from pneumonia.data.datamodule import ChestXrayDataModule
    from pneumonia.data.imageset import ImageSet

    images = ImageSet(torch.zeros(4, 1, 64, 64, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]),
                      ["a", "b", "c", "d"], ["a", "b", "c", "d"])  # fmt: skip
    dm = ChestXrayDataModule(images, None, progressive=ProgressiveConfig(32, 0.5), planned_epochs=4)

    class FakeTrainer:
        current_epoch, training = 0, True

    dm.trainer = FakeTrainer()
    dm.epoch_offset = 3 * 1 - 0  # round index 3 of 1 local epoch, a Trainer at epoch 0
    assert dm.training_side() == 64
    dm.epoch_offset = 1
    assert dm.training_side() == 48


@pytest.mark.parametrize(
    ("total", "sides"),
    [(1, [64]), (2, [32, 64]), (3, [32, 48, 64]), (4, [32, 32, 48, 64])],
)
def test_a_short_run_ends_at_the_final_side(total, sides):
    cfg = ProgressiveConfig(start_size=32, final_fraction=0.05)
    assert [size_at(e, total, cfg, 64) for e in range(total)] == sides


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (ProgressiveConfig(start_size=32, final_fraction=1.0), "leaves no epoch to ramp over"),
        (ProgressiveConfig(start_size=0, final_fraction=0.5), "is set but"),
    ],
)
def test_a_fraction_that_means_nothing_is_refused(cfg, message):
    with pytest.raises(UserError, match=message):
        check_progressive(cfg, 64)


def test_a_start_side_the_model_cannot_take_is_one_line(tmp_path, capsys):
    # AlexNet takes 64 px but not 16: refused before any data is read, naming the key.
    with pytest.raises(SystemExit) as exit_info:
        fit.main([*TINY, "--model.name", "alexnet", "--model.width", "64",
                  "--data.image_size", "64", "--run_dir", str(tmp_path / "run")])  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "data.progressive.start_size 16 is too small for model alexnet" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_resume_may_not_lengthen_a_progressive_schedule():
    from pneumonia.run.rundir import why_not_longer

    old = {"trainer.max_epochs": 8, "optim.scheduler": "none", "optim.weight_averaging": "none"}
    new = dict(old, **{"trainer.max_epochs": 16})
    assert why_not_longer("trainer.max_epochs", old, new) is None  # without progressive: allowed
    new["data.progressive.start_size"] = 32
    assert "data.progressive" in why_not_longer("trainer.max_epochs", old, new)
