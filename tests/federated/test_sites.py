"""Sites that differ: acquisition profiles, per-site validation, the cross-site matrix and
leave-one-site-out runs, on tiny synthetic data."""

import csv

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_federated_fit import FEDERATED

from pneumonia import fit
from pneumonia.core.errors import UserError
from pneumonia.data.imageset import ImageSet
from pneumonia.data.sites import (
    SiteProfile,
    apply_profile,
    site_profile,
    site_profiles,
    validation_sites,
)
from pneumonia.data.sources import load_splits
from pneumonia.federated.client import Client
from pneumonia.federated.cohort import LocalCohort
from pneumonia.inference.scoring import evaluate_imageset, evaluate_sets
from pneumonia.run.config import parse_fit_config
from pneumonia.run.sites import with_sites
from pneumonia.training.checkpoint import load_module


def images(n=6, side=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, side, side), generator=g, dtype=torch.uint8)


# -- profiles ------------------------------------------------------------------------------


def test_a_site_profile_is_the_same_for_the_same_seed_and_site_and_differs_between_sites():
    assert site_profile(2, seed=5) == site_profile(2, seed=5)
    assert site_profiles(4, seed=5)[2] == site_profile(2, seed=5)  # not by the site count
    profiles = site_profiles(4, seed=5)
    assert len({p for p in profiles}) == 4
    assert site_profile(0, seed=5) != site_profile(0, seed=6)


def test_a_profile_keeps_dtype_shape_and_range_and_is_deterministic():
    x = images()
    p = site_profile(1, seed=3)
    a, b = apply_profile(x, p, seed=9), apply_profile(x, p, seed=9)
    assert a.dtype == torch.uint8 and a.shape == x.shape
    assert torch.equal(a, b)
    assert not torch.equal(a, x)
    other = apply_profile(x, site_profile(2, seed=3), seed=9)
    assert (a.float() - other.float()).abs().mean() > 1.0  # two sites image differently


def test_profile_ranges_stop_short_of_the_shift_validation_severities():
    """Each site parameter lies inside its documented range, outside shift validation's."""
    for j in range(50):
        p = site_profile(j, seed=11)
        assert 0.55 <= p.resolution <= 1.0  # shift lowres: 0.35-0.5
        assert 0.79 < p.gamma < 1.26  # shift gamma: <= 0.741 or >= 1.35
        assert abs(p.contrast - 1) <= 0.2  # shift contrast: 0.25-0.45
        assert 0.005 <= p.noise <= 0.025  # shift noise: 0.03-0.06
        assert -1 <= p.sharpness <= 1  # blur sigma up to 0.01 x side; shift: 0.012-0.025


def test_a_pure_gamma_profile_is_the_tone_curve_by_hand():
    flat = torch.full((1, 1, 8, 8), 64, dtype=torch.uint8)
    p = SiteProfile(resolution=1.0, sharpness=0.0, contrast=1.0, gamma=2.0, noise=0.0)
    out = apply_profile(flat, p, seed=0)
    assert torch.all(out == 16)  # (64 / 255) ** 2 * 255 = 16.06


# -- validation by site --------------------------------------------------------------------


def toy_set(labels: list[int], per_patient: int = 1) -> ImageSet:
    n = len(labels) * per_patient
    return ImageSet(
        torch.zeros(n, 1, 4, 4, dtype=torch.uint8),
        torch.tensor([lab for lab in labels for _ in range(per_patient)]),
        [f"p{i}" for i in range(len(labels)) for _ in range(per_patient)],
        [f"img{i}" for i in range(n)],
        ("NORMAL", "PNEUMONIA"),
    )


def test_validation_patients_follow_each_sites_class_mix():
    """Site 0 trains on NORMAL only, site 1 on PNEUMONIA only: their validation follows."""
    val = toy_set([0] * 6 + [1] * 6, per_patient=2)
    table = [{"NORMAL": 10, "PNEUMONIA": 0}, {"NORMAL": 0, "PNEUMONIA": 10}]
    site = validation_sites(val, table, seed=0)
    assert site.tolist() == [0] * 12 + [1] * 12
    even = validation_sites(val, [{"NORMAL": 5, "PNEUMONIA": 5}] * 2, seed=0)
    assert torch.bincount(even).tolist() == [12, 12]
    for p in range(12):  # a patient stays on one site
        assert even[2 * p] == even[2 * p + 1]


def test_hospital_folders_give_each_patient_its_folder():
    val = toy_set([0, 1, 0])
    val.patients[:] = ["b/p0", "a/p1", "c/p2"]
    assert validation_sites(val, [], seed=0, folders=["a", "b"]).tolist() == [1, 0, -1]


# -- runs ----------------------------------------------------------------------------------

SITES = [*FEDERATED, "--data.synthetic.n_patients", "60", "--federated.rounds", "1"]
SITES += ["--threshold", "0.5"]
SHIFTED = [*SITES, "--federated.partition", "sites_shift", "--federated.cross_site", "true"]


def sites_of(argv: list[str]):
    """The run's splits after site assignment, and its cohort, rebuilt from its options."""
    cfg, _, _ = parse_fit_config(argv)
    splits = load_splits(cfg.data, cfg.seed)
    cohort = LocalCohort(cfg, splits, {})
    return with_sites(splits, cfg, cohort), cohort, splits


@pytest.fixture(scope="module")
def shifted_run(tmp_path_factory):
    """3 feature-shifted sites, one round, with the cross-site matrix."""
    run_dir = tmp_path_factory.mktemp("sites") / "run"
    summary = fit.main([*SHIFTED, "--run_dir", str(run_dir)])
    return summary, run_dir


def test_rounds_csv_tensorboard_and_summary_hold_each_sites_figures(shifted_run):
    summary, run_dir = shifted_run
    with open(run_dir / "rounds.csv") as f:
        row = next(csv.DictReader(f))
    for j in range(3):
        assert f"site{j}_val_accuracy" in row and f"site{j}_val_auroc" in row
    by_site = summary["val_by_site"]
    assert sorted(by_site) == ["site0", "site1", "site2"]
    assert sum(v["n"] for v in by_site.values()) == summary["val"]["n"]
    assert all(set(v["ci95"]) >= {"accuracy", "auroc"} for v in by_site.values())
    assert len(summary["federated"]["site_profiles"]) == 3
    events = EventAccumulator(str(run_dir)).Reload()
    assert "sites/site1/val/accuracy" in events.Tags()["scalars"]


def test_site_images_are_reimaged_in_training_and_validation():
    splits, cohort, raw = sites_of(SHIFTED)
    assert not torch.equal(splits.val.images, raw.val.images)
    assert splits.val.names == raw.val.names  # the same patients, imaged otherwise
    first = cohort.data[0]
    untouched = raw.train.subset(torch.tensor([raw.train.names.index(n) for n in first.names]))
    assert not torch.equal(first.images, untouched.images)


def test_the_cross_site_matrix_diagonal_is_each_local_models_own_validation(shifted_run):
    summary, run_dir = shifted_run
    with open(run_dir / "cross_site.csv") as f:
        rows = {(r["model"], r["data"]): r for r in csv.DictReader(f)}
    models = ("local_site0", "local_site1", "local_site2", "global")
    assert set(rows) == {(m, f"site{d}") for m in models for d in range(3)}
    assert (run_dir / "cross_site.png").stat().st_size > 1000
    splits, _, _ = sites_of(SHIFTED)
    for j in range(3):
        own = splits.val.subset(torch.nonzero(splits.val_site == j).flatten())
        local = load_module(run_dir / "checkpoints" / f"local_site{j}.ckpt")
        values, _ = evaluate_imageset(local, own)
        cell = rows[f"local_site{j}", f"site{j}"]
        assert int(cell["n"]) == values["n"] == len(own)
        assert float(cell["accuracy"]) == pytest.approx(values["accuracy"], abs=1e-4)
        assert float(cell["auroc"]) == pytest.approx(values["auroc"], abs=1e-4)
        site = summary["val_by_site"][f"site{j}"]  # the global row: the per-site figures
        assert float(rows["global", f"site{j}"]["accuracy"]) == pytest.approx(
            site["accuracy"], abs=1e-4
        )


def test_one_sites_figures_are_the_pooled_figures(tiny_checkpoint):
    module = load_module(tiny_checkpoint)
    val = ImageSet(
        images(20, 32, seed=1),
        torch.tensor([0, 1] * 10),
        [f"p{i // 2}" for i in range(20)],
        [f"i{i}" for i in range(20)],
        ("NORMAL", "PNEUMONIA"),
    )
    out = evaluate_sets(module, {"val": val}, val_site=torch.zeros(20, dtype=torch.long))
    assert out["site0_val"] == out["val"]


def test_a_held_out_site_trains_nowhere_and_is_scored_whole(tmp_path):
    """Leave site 1 out: no client receives one of its training images; its training and
    validation images make the held_out set."""
    received: list[ImageSet] = []
    original = Client.__init__

    def spy(self, index, data, *args, **kwargs):
        received.append(data)
        return original(self, index, data, *args, **kwargs)

    argv = [*SITES, "--federated.partition", "sites_shift", "--federated.hold_out", "1"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Client, "__init__", spy)
        summary = fit.main([*argv, "--run_dir", str(tmp_path / "run")])
    splits, cohort, _ = sites_of(argv)
    held = set(cohort.site_data[1].names)
    assert len(received) == 2 and held
    assert all(not held & set(data.names) for data in received)
    held_val = int((sites_of(argv)[0].val_site == 1).sum())
    assert held_val == 0  # moved out of the pooled validation
    assert summary["held_out"]["n"] == len(splits.held_out) > len(held)
    assert set(splits.held_out.names) >= held
    assert summary["federated"]["clients"] == 2 and summary["federated"]["hold_out"] == 1
    with open(tmp_path / "run" / "rounds.csv") as f:
        assert "held_out_accuracy" in next(csv.DictReader(f))
    with open(tmp_path / "run" / "split.csv") as f:
        split = {}
        for row in csv.DictReader(f):
            split.setdefault(row["split"], set()).add(row["name"])
    assert split["held_out"] == set(splits.held_out.names) and not held & split["train"]


def test_pooled_sites_are_one_client_holding_the_kept_sites():
    argv = [*SITES, "--federated.hold_out", "0", "--federated.pooled", "true"]
    _, cohort, _ = sites_of(argv)
    assert len(cohort) == 1 and cohort.client_sites == [[1, 2]]
    assert sorted(cohort.data[0].names) == sorted(
        cohort.site_data[1].names + cohort.site_data[2].names
    )
    assert cohort.table[0]["sites"] == "1;2"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--federated.hold_out", "3"], "federated.hold_out 3 is not one of the 3 sites"),
        (["--federated.pooled", "true", "--federated.cross_site", "true"], "federated.cross_site"),
        (["--federated.hold_out", "0", "--federated.hostile.client", "1"], "renumber them"),
        (["--federated.pooled", "true", "--federated.min_clients", "2"], "min_clients 2 is more"),
    ],
)
def test_bad_site_options_are_one_line(extra, message, tmp_path):
    with pytest.raises(UserError, match=message):
        fit.run([*SITES, *extra, "--run_dir", str(tmp_path / "run")])


def test_site_options_need_a_federation(tmp_path):
    with pytest.raises(UserError, match="set federated.enabled true"):
        fit.run([*SITES, "--federated.enabled", "false", "--federated.site_shift", "true",
                 "--run_dir", str(tmp_path / "run")])  # fmt: skip


def test_a_run_recorded_before_an_option_existed_resumes_when_it_is_at_its_default(tmp_path):
    """checkpoints/config.yaml of an older release lacks data.roi and the site options; at
    their defaults they are no edit, set otherwise they are."""
    from pneumonia.run.rundir import check_resume_config

    _, resolved, _ = parse_fit_config(SITES)
    old = yaml.safe_load(resolved)
    del old["data"]["roi"], old["federated"]["site_shift"], old["federated"]["cross_site"]
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "config.yaml").write_text(yaml.safe_dump(old))
    assert check_resume_config(tmp_path, resolved) == []
    _, shifted, _ = parse_fit_config([*SITES, "--federated.site_shift", "true"])
    with pytest.raises(UserError, match="federated.site_shift None -> True"):
        check_resume_config(tmp_path, shifted)


def test_a_site_with_one_class_has_no_auroc(tiny_checkpoint):
    module = load_module(tiny_checkpoint)
    val = ImageSet(images(4, 32), torch.tensor([1, 1, 1, 1]), ["a", "b", "c", "d"],
                   ["1", "2", "3", "4"], ("NORMAL", "PNEUMONIA"))  # fmt: skip
    out = evaluate_sets(module, {"val": val}, val_site=torch.tensor([0, 0, 1, 1]))
    assert out["site0_val"]["auroc"] != out["site0_val"]["auroc"]  # nan, not torchmetrics' 0
    assert out["site1_val"]["accuracy"] in (0.0, 0.5, 1.0)
