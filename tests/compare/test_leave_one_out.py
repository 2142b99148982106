"""A comparison's leave_out entries and `--only`: what they expand to, without training."""

import csv

import pytest
import yaml

from pneumonia.compare.__main__ import main as compare_main
from pneumonia.compare.__main__ import only_entries
from pneumonia.compare.plan import load_comparison
from pneumonia.core.errors import UserError

SPEC = {
    "name": "loso",
    "shared": {
        "data": {"image_size": 32, "synthetic": {"n_patients": 40}},
        "model": {"width": 16},
        "federated": {"enabled": True, "rounds": 2, "local_epochs": 1, "partition": "sites_shift"},
    },  # fmt: skip
    "entries": [
        {"name": "site1", "label": "site 1 out", "leave_out": 1},
        {"name": "all", "label": "every site"},
    ],  # fmt: skip
}


def comparison(tmp_path, spec=SPEC):
    path = tmp_path / "loso.yaml"
    path.write_text(yaml.safe_dump(spec))
    return load_comparison(path, [], tmp_path / "reports", tmp_path / "runs")


def test_a_leave_out_entry_is_a_federated_and_a_pooled_run_without_that_site(tmp_path):
    entries = comparison(tmp_path).entries
    assert [e.name for e in entries] == ["site1_federated", "site1_pooled", "all"]
    fed, pooled, every = (e.cfg.federated for e in entries)
    assert fed.hold_out == pooled.hold_out == 1 and every.hold_out is None
    assert fed.cross_site and not fed.pooled  # the single-site models come from cross_site
    assert pooled.pooled and not pooled.cross_site
    assert entries[0].label == "site 1 out: federated over the rest"
    assert len({e.budget for e in entries}) == 1


def test_a_leave_out_must_name_a_site(tmp_path):
    bad = {**SPEC, "entries": [{"name": "x", "leave_out": "one"}]}
    with pytest.raises(UserError, match="leave_out must be a site index"):
        comparison(tmp_path, bad)
    far = {**SPEC, "entries": [{"name": "x", "leave_out": 5}]}
    with pytest.raises(UserError, match="federated.hold_out 5 is not one of the 3 sites"):
        comparison(tmp_path, far)


def test_only_keeps_the_named_entries_and_refuses_unknown_ones(tmp_path):
    kept = only_entries(comparison(tmp_path), "site1")
    assert [e.name for e in kept.entries] == ["site1_federated", "site1_pooled"]
    assert "this report: entries site1_federated, site1_pooled only" in kept.description
    assert [e.name for e in only_entries(comparison(tmp_path), "all").entries] == ["all"]
    with pytest.raises(UserError, match="--only 'nope' is not an entry"):
        only_entries(comparison(tmp_path), "all,nope")


def test_only_naming_every_entry_reports_the_whole_study(tmp_path):
    whole = comparison(tmp_path)
    names = ",".join(e.name for e in whole.entries)
    assert "this report" not in only_entries(comparison(tmp_path), names).description


def test_a_leave_one_out_report_scores_every_model_on_the_held_out_site(tmp_path):
    spec = {**SPEC, "entries": [SPEC["entries"][0]]}
    spec["shared"] = {**SPEC["shared"], "federated": {**SPEC["shared"]["federated"], "rounds": 1}}
    spec["shared"]["trainer"] = {"enable_progress_bar": False, "enable_model_summary": False}
    path = tmp_path / "loso.yaml"
    path.write_text(yaml.safe_dump(spec))
    report = compare_main(["--config", str(path), "--reports_root", str(tmp_path / "reports"),
                           "--runs_root", str(tmp_path / "runs")])  # fmt: skip
    with open(tmp_path / "reports" / "loso" / "leave_one_site_out.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == [
        "site 0 alone", "site 2 alone", "federated over the rest", "centralized over the rest"
    ]  # fmt: skip
    assert len({r["n"] for r in rows}) == 1 and all(r["held_out"] == "1" for r in rows)
    for r in rows:
        assert float(r["accuracy_low"]) <= float(r["accuracy"]) <= float(r["accuracy_high"])
    assert "## Leave one site out" in (tmp_path / "reports" / "loso" / "results.md").read_text()
    assert report == str(tmp_path / "reports" / "loso")
