"""Subgroups of a validation set by file-name family, and their figures in a run's summary."""

import torch

from pneumonia.data.groups import OTHER, family_groups, file_family
from pneumonia.data.imageset import ImageSet
from pneumonia.inference.scoring import score_groups
from pneumonia.run.finalize import worst_groups
from pneumonia.training.module import ClassifierModule


def test_kermany_families():
    assert file_family("IM-0115-0001.jpeg") == "IM"
    assert file_family("IM-0629-0001-0003.jpeg") == "IM"
    assert file_family("NORMAL2-IM-1427-0001.jpeg") == "NORMAL-IM"
    assert file_family("person1000_bacteria_2931.jpeg") == "person-bacteria"
    assert file_family("person447_virus_921_1.jpeg") == "person-virus"
    assert file_family("person1_virus_1.jpeg#blur") == "person-virus"  # a shifted copy
    assert file_family("0001.png") == OTHER


def test_small_families_pooled_and_one_family_is_no_grouping():
    # Two families of 12 and 10 images, each too small alone: 22 together, kept as "other".
    names = ["IM-1-1.jpeg"] * 25 + ["person1_virus_1.jpeg"] * 21 + ["odd.png", "x1.png"] * 11
    groups = family_groups(names)
    assert list(groups) == ["IM", OTHER, "person-virus"]
    assert groups[OTHER] == list(range(46, 68))
    assert family_groups(["IM-1-1.jpeg"] * 30) == {}


def module_at(threshold: float = 0.5) -> ClassifierModule:
    model = {"name": "resnet18", "width": 16}
    return ClassifierModule(model, {}, image_size=32, threshold=threshold)


def test_group_figures_against_a_hand_counted_matrix():
    # 20 NORMAL "IM" images (4 called PNEUMONIA), 20 NORMAL "NORMAL2-IM" (10 called
    # PNEUMONIA), 20 bacterial pneumonias (all found): one patient per image.
    names = [f"IM-{i}-0001.jpeg" for i in range(20)]
    names += [f"NORMAL2-IM-{i}-0001.jpeg" for i in range(20)]
    names += [f"person{i}_bacteria_{i}.jpeg" for i in range(20)]
    labels = torch.tensor([0] * 40 + [1] * 20)
    probs = torch.tensor([0.9] * 4 + [0.1] * 16 + [0.8] * 10 + [0.2] * 10 + [0.7] * 20)
    images = ImageSet(torch.zeros(60, 1, 32, 32, dtype=torch.uint8), labels, names, names)
    groups = score_groups(module_at(), images, probs)
    assert set(groups) == {"IM", "NORMAL-IM", "person-bacteria"}
    im = groups["IM"]
    assert im["confusion_matrix"] == [[16, 4], [0, 0]]
    assert abs(im["accuracy"] - 16 / 20) < 1e-6 and abs(im["specificity"] - 0.8) < 1e-6
    normal2 = groups["NORMAL-IM"]
    assert normal2["confusion_matrix"] == [[10, 10], [0, 0]]
    assert abs(normal2["accuracy"] - 0.5) < 1e-6
    assert groups["person-bacteria"]["confusion_matrix"] == [[0, 0], [0, 20]]
    low, high = normal2["ci95"]["accuracy"]
    assert low < 0.5 < high


def test_worst_group_and_the_warning():
    summary = {
        "val": {"accuracy": 0.9, "ci95": {"accuracy": [0.85, 0.95]}},
        "val_by_group": {
            "IM": {"accuracy": 0.92, "ci95": {"accuracy": [0.88, 0.96]}, "n": 50},
            "NORMAL-IM": {"accuracy": 0.70, "ci95": {"accuracy": [0.6, 0.8]}, "n": 40},
        },
        "val_by_site": {"site0": {"accuracy": 0.8, "ci95": {"accuracy": [0.7, 0.9]}, "n": 30}},
    }
    worst = worst_groups(summary)
    assert worst == {
        "val": {"group": "NORMAL-IM", "accuracy": 0.7, "ci95": [0.6, 0.8], "n": 40, "hidden": True}
    }
    summary["val_by_group"]["NORMAL-IM"]["ci95"]["accuracy"] = [0.6, 0.86]
    assert worst_groups(summary)["val"]["hidden"] is False  # overlaps the average's interval


def test_a_small_other_is_left_out():
    names = ["IM-1-1.jpeg"] * 25 + ["person1_virus_1.jpeg"] * 21 + ["odd.png"] * 3
    assert list(family_groups(names, min_size=20)) == ["IM", "person-virus"]


def test_a_run_reports_its_groups(tmp_path, kermany_root, monkeypatch, capsys):
    """A real folder's families reach summary.json, TensorBoard and the printed summary, and
    the whole set's verdict/val/* scalars stay the whole set's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pneumonia import fit
    from pneumonia.data import groups

    monkeypatch.setattr(groups, "MIN_GROUP", 2)  # the tiny folder's families are small
    run_dir = tmp_path / "run"
    summary = fit.main([
        "--data.root", str(kermany_root), "--data.image_size", "32", "--data.val_fraction", "0.5",
        "--model.name", "resnet18", "--model.width", "16", "--federated.enabled", "false",
        "--trainer.max_epochs", "1", "--figures_every", "0", "--run_dir", str(run_dir),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    ])  # fmt: skip
    by_group = summary["val_by_group"]
    assert len(by_group) >= 2 and sum(v["n"] for v in by_group.values()) <= summary["val"]["n"]
    assert summary["worst_group"]["val"]["group"] in by_group
    assert "val acc by file family" in capsys.readouterr().out
    events = EventAccumulator(str(run_dir)).Reload()
    tags = events.Tags()["scalars"]
    assert {f"verdict/val_by_group/{family}" for family in by_group} <= set(tags)
    accuracy = events.Scalars("verdict/val/accuracy")[-1].value
    assert abs(accuracy - summary["val"]["accuracy"]) < 1e-6
