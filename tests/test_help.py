"""`--help` tells the truth and helps: every key listed has a description (its config field's
comment), every key a registry serves lists the registry's names, the defaults shown are the
values a plain run resolves (configs/default.yaml), trainer.* is cut to the arguments the
configs use while every Trainer argument still parses, and the commands answer --help without
loading training's libraries."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pneumonia import ensemble, evaluate, export, fit, predict
from pneumonia.core.registry import Entry, Registry
from pneumonia.federated.strategies import STRATEGIES
from pneumonia.run.config import build_fit_parser, parse_fit_config
from pneumonia.run.helptext import TRAINER_SHOWN, field_comments, listed
from pneumonia.serve import __main__ as serve

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def parser():
    return build_fit_parser()


@pytest.fixture(scope="module")
def plain_help() -> str:
    return fit.fit_help([])


def section(text: str, option: str) -> str:
    """The help of one option: from its invocation to the next option, on one line."""
    start = re.search(rf"^  {re.escape(option)}[ \n,]", text, re.MULTILINE)
    assert start is not None, f"{option} is not in the help"
    end = re.search(r"^  -", text[start.end() :], re.MULTILINE)
    body = text[start.start() : start.end() + (end.start() if end else len(text))]
    return " ".join(body.split())


def shown_default(text: str, option: str) -> str:
    match = re.search(r"default: (.+?)\)$", section(text, option))
    assert match is not None, section(text, option)
    return match[1]


def test_every_key_the_fit_help_lists_is_described(parser):
    listed_actions = [a for a in parser._actions if a.option_strings and listed(a)]
    assert len(listed_actions) > 150  # the config groups' keys, not only the top level
    bare = [a.dest for a in listed_actions if not (a.help or "").strip()]
    assert not bare, f"keys with no description (a comment on their config field): {bare}"


@pytest.mark.parametrize("module", [evaluate, predict, export, ensemble, serve])
def test_every_option_of_the_tools_is_described(module):
    parser = module.build_parser()
    bare = [a.dest for a in parser._actions if listed(a) and not (a.help or "").strip()]
    assert not bare, f"{module.__name__}: options with no help: {bare}"


def test_a_registry_key_lists_every_registered_name(parser, monkeypatch):
    monkeypatch.setitem(STRATEGIES._entries, "fedsketch", Entry(object))  # registered late
    text = build_fit_parser().format_help()
    strategy = section(text, "--federated.strategy")
    for name in STRATEGIES.names():
        assert re.search(rf"\b{name}\b", strategy), name
    assert "fedsketch" in strategy
    keys = {a.dest for a in parser._actions}
    served = [r for r in Registry.every() if r.key in keys]
    assert {"model.name", "federated.strategy", "optim.name", "loss.name"} <= {
        r.key for r in served
    }
    for registry in served:
        if registry.key == "optim.scheduler":  # its Literal adds torch's schedulers
            continue
        help_of = section(text, f"--{registry.key}")
        missing = [n for n in registry.choices() if n not in help_of]
        assert not missing, f"--{registry.key} does not list {missing}"


def test_the_defaults_shown_are_a_plain_runs_resolved_config(plain_help):
    _, config_yaml, _ = parse_fit_config([])
    resolved = yaml.safe_load(config_yaml)
    keys = [
        "data.image_size",
        "data.batch_size",
        "data.augment.enabled",
        "federated.enabled",
        "federated.rounds",
        "federated.round_lr",
        "monitor",
        "optim.lr",
        "optim.scheduler",
        "trainer.max_epochs",
        "trainer.log_every_n_steps",
    ]
    for key in keys:
        value = resolved
        for part in key.split("."):
            value = value[part]
        expected = json.dumps(value) if isinstance(value, bool) else str(value)
        assert shown_default(plain_help, f"--{key}") == expected, key
    assert shown_default(plain_help, "--data.image_size") == "64"  # not the built-in 224
    assert "configs/default.yaml" in plain_help.split("options:")[0]


def test_with_a_config_the_defaults_shown_are_its_values_over_the_built_in_ones(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    Path("mine.yaml").write_text("data: {image_size: 96}\n")
    text = fit.fit_help(["--config", "mine.yaml", "--help"])
    assert shown_default(text, "--data.image_size") == "96"
    assert shown_default(text, "--federated.enabled") == "false"  # default.yaml not read
    assert "overridden by mine.yaml" in " ".join(text.split("options:")[0].split())


def test_trainer_help_is_cut_while_every_trainer_argument_still_parses(plain_help, parser):
    trainer = [line for line in plain_help.splitlines() if line.startswith("  --trainer.")]
    assert {line.split()[0] for line in trainer} == {f"--{key}" for key in TRAINER_SHOWN}
    assert "known subclasses" not in plain_help and "--trainer.plugins" not in plain_help
    assert "any other argument of lightning.pytorch.Trainer" in " ".join(plain_help.split())
    _, config_yaml, _ = parse_fit_config(["--trainer.limit_train_batches", "2"])
    trainer_cfg = yaml.safe_load(config_yaml)["trainer"]
    assert trainer_cfg["limit_train_batches"] == 2
    hidden = {a.dest for a in parser._actions if a.dest.startswith("trainer.") and not listed(a)}
    assert {f"trainer.{key}" for key in trainer_cfg} >= hidden - {
        a.dest for a in parser._actions if a.dest.endswith(".help")
    }


def test_fit_help_exits_0_with_usage_and_no_traceback(capsys):
    with pytest.raises(SystemExit) as stop:
        fit.main(["--data.image_size", "32", "-h"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m pneumonia.fit [--config FILE]")
    assert len(out.splitlines()) < 800


def test_ranges_are_words_and_booleans_read_as_yaml(plain_help):
    assert "(integer >= 16 and <= 2048, default: 64)" in section(plain_help, "--data.image_size")
    assert section(plain_help, "--federated.enabled").endswith("(default: true)")
    assert "OpenUnitInterval" not in plain_help


@dataclass
class _Commented:
    """Docstring, not a field's help."""

    plain: int = 1
    # Above, on two
    # lines.
    above: int = 2
    trailing: int = 3  # on its line
    wrapped: float = 0.5  # inside the parentheses

    unrelated: int = 4  # type: ignore[misc]


def test_field_comments_are_the_lines_above_and_on_the_field():
    assert field_comments(_Commented) == {
        "above": "Above, on two lines.",
        "trailing": "on its line",
        "wrapped": "inside the parentheses",
    }


COMMANDS = ["fit", "evaluate", "predict", "export", "compare.__main__"]


def test_the_commands_answer_help_without_trainings_libraries():
    heavy = ("torch", "lightning", "torchmetrics", "flwr", "matplotlib", "sklearn", "onnx")
    probe = (
        "import importlib, json, sys\n"
        f"for name in {COMMANDS!r}:\n"
        "    importlib.import_module('pneumonia.' + name)\n"
        f"print(json.dumps([m for m in {heavy!r} if m in sys.modules]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out) == []
