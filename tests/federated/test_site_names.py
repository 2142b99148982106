"""Hospital folders (federated.partition sites) keep their names in what a run writes:
partition.csv's `site_name` column, summary.json's federated.site_names (by the site keys every
per-site output uses) and each val_by_site entry's `site_name`; site<j> keys stay as they were."""

import csv

import pytest
from test_federated_fit import FEDERATED

from pneumonia import fit
from pneumonia.data.sources import load_splits
from pneumonia.federated.cohort import LocalCohort
from pneumonia.run.config import parse_fit_config


@pytest.fixture
def hospitals(tmp_path, write_kermany):
    root = tmp_path / "hospitals"
    write_kermany(root / "north", 4, 5, size=(40, 40), first_patient=100)
    write_kermany(root / "south", 5, 6, size=(40, 40), first_patient=100)  # same patient ids
    write_kermany(root / "west", 4, 5, size=(40, 40), first_patient=300)
    return root


def sites_argv(root) -> list[str]:
    return [*FEDERATED, "--federated.partition", "sites", "--data.root", str(root),
            "--data.val_fraction", "0.3", "--federated.rounds", "1"]  # fmt: skip


def test_a_run_records_each_hospitals_folder_name(hospitals, tmp_path):
    run_dir = tmp_path / "run"
    summary = fit.main([*sites_argv(hospitals), "--run_dir", str(run_dir)])
    with open(run_dir / "partition.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["client"], r["site_name"]) for r in rows] == [
        ("0", "north"),
        ("1", "south"),
        ("2", "west"),
    ]
    federated = summary["federated"]
    assert federated["site_names"] == {"site0": "north", "site1": "south", "site2": "west"}
    assert [r["site_name"] for r in federated["partition_table"]] == ["north", "south", "west"]
    by_site = summary["val_by_site"]
    assert {k: v["site_name"] for k, v in by_site.items()} == {
        k: federated["site_names"][k] for k in by_site
    }
    assert all("accuracy" in v and "n" in v for v in by_site.values())  # the figures as before


def cohort(argv: list[str]) -> LocalCohort:
    cfg, _, _ = parse_fit_config(argv)
    return LocalCohort(cfg, load_splits(cfg.data, cfg.seed, sites=True), {})


def test_held_out_and_pooled_hospitals_are_named_per_client(hospitals):
    held = cohort([*sites_argv(hospitals), "--federated.hold_out", "1"])
    assert [(r["client"], r["sites"], r["site_name"]) for r in held.table] == [
        (0, "0", "north"),
        (1, "2", "west"),
    ]
    assert [r["site_name"] for r in held.site_table] == ["north", "south", "west"]
    pooled = cohort([*sites_argv(hospitals), "--federated.pooled", "true"])
    assert pooled.table[0]["site_name"] == "north;south;west"


def test_simulated_sites_have_no_names():
    argv = [*FEDERATED, "--federated.partition", "sites_shift", "--federated.clients", "2"]
    cfg, _, _ = parse_fit_config(argv)
    simulated = LocalCohort(cfg, load_splits(cfg.data, cfg.seed), {})
    assert all("site_name" not in r for r in simulated.table + simulated.site_table)
