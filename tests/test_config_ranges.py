"""Every numeric config field has a range, and every value outside it is one line naming the
key and the range, before any run directory exists (property-style: the values are derived
from the ranges themselves, so a new field is covered when it gets its type)."""

from __future__ import annotations

import operator
import types
import typing
from dataclasses import fields, is_dataclass

import pytest

from pneumonia import fit
from pneumonia.run.config import config_groups

GROUPS = config_groups()
# Numeric fields with no range, and why.
UNBOUNDED = {"federated.hostile.scale": "any factor is an attack worth simulating"}
SMALL = ["--data.image_size", "32", "--data.synthetic.n_patients", "20", "--model.width", "16"]


def numeric_fields(cls, prefix: str):
    """(dotted key, annotated type) of every int or float field, through nested dataclasses."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        kind, key = hints[f.name], f"{prefix}.{f.name}"
        if is_dataclass(kind):
            yield from numeric_fields(kind, key)
            continue
        inner = [a for a in typing.get_args(kind) if a is not type(None)]
        base = inner[0] if isinstance(kind, types.UnionType) and len(inner) == 1 else kind
        if isinstance(base, type) and issubclass(base, (int, float)) and base is not bool:
            yield key, base


FIELDS = [field for group, cls in GROUPS.items() for field in numeric_fields(cls, group)]


def outside(restriction) -> object:
    """A value that breaks one restriction (op, bound) of a range."""
    op, bound = restriction
    step = {operator.gt: 0, operator.ge: -1, operator.lt: 0, operator.le: 1}[op]
    return bound + step


def test_every_numeric_field_has_a_range():
    assert len(FIELDS) > 40
    missing = [k for k, kind in FIELDS if not hasattr(kind, "_restrictions") and k not in UNBOUNDED]
    assert not missing, f"give these a type from pneumonia.core.bounds: {missing}"


CASES = [
    (key, outside(r))
    for key, kind in FIELDS
    if hasattr(kind, "_restrictions")
    for r in kind._restrictions
] + [("seed", -1), ("seed", 2**32), ("threshold", 0), ("threshold", 1.5)]


@pytest.mark.parametrize(("key", "value"), CASES, ids=[f"{k}={v}" for k, v in CASES])
def test_a_value_outside_its_range_is_one_line_and_no_run(key, value, tmp_path, capsys):
    runs = tmp_path / "runs"
    with pytest.raises(SystemExit) as stopped:
        fit.main([*SMALL, f"--{key}", str(value), "--runs_root", str(runs)])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {key} {value} must be "), err
    assert not runs.exists()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--trainer.max_epochs", "0"], "trainer.max_epochs 0 must be at least 1"),
        (["--trainer.max_epochs", "-1"], "trainer.max_epochs -1 must be at least 1"),
        (["--trainer.log_every_n_steps", "0"], "trainer.log_every_n_steps 0 must be >= 1"),
        (["--trainer.devices", "0"], "trainer.*: `Trainer(devices='0')` value is not a valid"),
        (["--data.augment.scale_min", "1.2", "--data.augment.scale_max", "1.1"],
         "data.augment.scale_min 1.2 is above data.augment.scale_max 1.1"),
        (["--data.synthetic.pneumonia_fraction", "0"],
         "data.synthetic.pneumonia_fraction 0 must be > 0 and < 1"),
        (["--data.synthetic.pneumonia_fraction", "1"],
         "data.synthetic.pneumonia_fraction 1 must be > 0 and < 1"),
        (["--federated.enabled", "true", "--federated.hostile.client", "3"],
         "federated.hostile.client 3 is not one of the 3 clients (0-2)"),
        (["--data.batch_size", "many"], 'Parser key "data.batch_size"'),
    ],
)  # fmt: skip
def test_settings_no_run_could_use_are_one_line_and_no_run(argv, expected, tmp_path, capsys):
    runs = tmp_path / "runs"
    with pytest.raises(SystemExit) as stopped:
        fit.main([*SMALL, *argv, "--runs_root", str(runs)])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not runs.exists()


def test_an_accelerator_that_is_not_there_is_one_line(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        fit.main([*SMALL, "--trainer.accelerator", "gpu", "--runs_root", str(tmp_path)])
    assert capsys.readouterr().err.strip() == (
        "error: trainer.accelerator gpu: this machine has no CUDA device: use auto or cpu"
    )


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"- a\n- b\n", "is a list: a config is a mapping of keys"),
        (b"", "is empty: a config is a mapping of keys"),
        (b"just words\n", "is a str: a config is a mapping of keys"),
        (bytes(range(128, 256)), "is not text: --config takes a YAML file"),
        (b"data: 3\n", ": data is a group of keys, not 3"),
        (b"data:\n  batch_size: [1\n", "is not valid YAML at line 3"),
    ],
)
def test_a_config_file_that_is_not_a_mapping_is_one_line_naming_it(
    content, expected, tmp_path, capsys
):
    config = tmp_path / "bad.yaml"
    config.write_bytes(content)
    with pytest.raises(SystemExit) as stopped:
        fit.main(["--config", str(config), "--runs_root", str(tmp_path / "runs")])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {config}") and expected in err[0], err
    assert not (tmp_path / "runs").exists()
