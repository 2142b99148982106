"""A comparison's leave_out entries and `--only`: what they expand to, without training."""

import pytest
import yaml

from pneumonia.compare.__main__ import only_entries
from pneumonia.compare.plan import load_comparison
from pneumonia.errors import UserError

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
