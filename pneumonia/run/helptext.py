"""What `--help` says about the fit config: every key described by its config field's comments,
the choices of every key a `Registry` serves, ranges as words, and Lightning's trainer.* cut to
the arguments the configs use. Only the help changes: every key parses, validates and goes to
config.yaml as before.

- `field_comments(cls)`: each dataclass field's comment, which is its help text: the comment
  lines right above the field (no blank line between) and those on the field's own lines, less
  pragmas (`# type: ...`, `# noqa`). Write them for the user; a note for developers goes in
  the class docstring.
- `describe(parser, groups)`: the help of every key of the config dataclasses in `groups`
  (`{"data": DataConfig, ...}`), the choices of each text key a live `Registry` serves
  (`Registry.every()`), and each group's title (its key) and description (its class
  docstring). Keys that already have a help keep it.
- `show_trainer(parser, shown, description)`: leaves every trainer.* key but those of `shown`
  (key: help text) out of the help, and says in the group's description how the others are
  given; `describe_fit` applies both to the fit parser. `listed(action)`: whether the help
  lists an option.
- `HelpFormatter`: ranges as words ("integer > 0" for PositiveInt), a Literal's choices only in
  the option's invocation (`{a,b}`), the description's paragraphs filled one by one (an
  indented paragraph kept as it is).
"""

from __future__ import annotations

import ast
import functools
import inspect
import io
import operator
import re
import tokenize
import types
import typing
from argparse import SUPPRESS, Action
from dataclasses import fields, is_dataclass
from pathlib import Path

from jsonargparse import ArgumentParser, DefaultHelpFormatter

from pneumonia.core.registry import Registry

# Comments that talk to tools, not people.
_PRAGMA = re.compile(r"^\s*(type:|noqa\b|pragma\b|fmt:)")
# jsonargparse's help for the option that loads a group from a file.
_GROUP_FILE = "Path to a configuration file."
# An option's type in words, where its help does not say it (HelpFormatter).
_WORDS = "pneumonia_type_words"
# Set on an option HelpFormatter leaves out (it still parses and goes to config.yaml).
_HIDDEN = "pneumonia_hidden"
_SYMBOLS = {operator.gt: ">", operator.ge: ">=", operator.lt: "<", operator.le: "<="}


def field_comments(cls: type) -> dict[str, str]:
    """{field name: its comment text} for the fields of dataclass `cls` (a class at the top
    of its module) that have one."""
    try:
        path = inspect.getsourcefile(cls)
    except TypeError:  # a class without a source file
        return {}
    return _module_comments(path).get(cls.__qualname__, {}) if path else {}


@functools.cache
def _module_comments(path: str) -> dict[str, dict[str, str]]:
    """{class name: {field name: comment}} for the top-level classes of a source file, read
    once (inspect.getsource would parse the whole module again for each class)."""
    try:
        source = Path(path).read_text(encoding="utf-8")
    except OSError:  # no source (a frozen build): keys go undescribed
        return {}
    comments, lines = _comments_by_line(source), source.splitlines()
    return {
        node.name: _field_texts(node, lines, comments)
        for node in ast.parse(source).body
        if isinstance(node, ast.ClassDef)
    }


def _field_texts(cls: ast.ClassDef, lines: list[str], comments: dict[int, str]) -> dict[str, str]:
    texts = {}
    for node in cls.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above: list[str] = []
        line = node.lineno - 1
        while line >= 1 and lines[line - 1].lstrip().startswith("#"):
            above.insert(0, comments.get(line, ""))
            line -= 1
        own = [comments.get(n, "") for n in range(node.lineno, (node.end_lineno or 0) + 1)]
        text = " ".join(t for t in above + own if t)
        if text:
            texts[node.target.id] = text
    return texts


def _comments_by_line(source: str) -> dict[int, str]:
    """{line number: its comment's text}, pragmas left out."""
    found = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            text = token.string.lstrip("#").strip()
            if text and not _PRAGMA.match(text):
                found[token.start[0]] = text
    return found


def field_help(cls: type, prefix: str) -> dict[str, str]:
    """{dotted key: help} for the fields of `cls` and of the dataclasses it nests."""
    helps = {}
    comments, hints = field_comments(cls), typing.get_type_hints(cls)
    for f in fields(cls):
        key = f"{prefix}.{f.name}"
        kind = hints[f.name]
        if isinstance(kind, type) and is_dataclass(kind):
            helps.update(field_help(kind, key))
        elif f.name in comments:
            helps[key] = comments[f.name]
    return helps


def group_classes(groups: dict[str, type]) -> dict[str, type]:
    """{group key: its dataclass} for `groups` and the dataclasses they nest."""
    found = {}
    for key, cls in groups.items():
        found[key] = cls
        hints = typing.get_type_hints(cls)
        nested = {
            f"{key}.{f.name}": hints[f.name]
            for f in fields(cls)
            if isinstance(hints[f.name], type) and is_dataclass(hints[f.name])
        }
        found.update(group_classes(nested))
    return found


def describe(parser: ArgumentParser, groups: dict[str, type]) -> None:
    """Describe the keys of `groups` (module docstring)."""
    helps = {k: v for key, cls in groups.items() for k, v in field_help(cls, key).items()}
    registries = {r.key: r for r in Registry.every()}
    for action in parser._actions:
        if action.help is SUPPRESS:
            continue
        if action.dest in helps and not action.help:
            action.help = helps[action.dest]
        registry = registries.get(action.dest)
        if registry is not None and _is_text(action):
            text = action.help or ""
            lead = " Choices: " if text.endswith(".") else "; choices: " if text else "Choices: "
            action.help = f"{text}{lead}{', '.join(registry.choices())}"
    classes = group_classes(groups)
    for key, group in getattr(parser, "groups", {}).items():
        if key in classes:
            group.title = f"{key}.*"
            group.description = inspect.cleandoc(classes[key].__doc__ or "")
    for action in parser._actions:
        if action.help == _GROUP_FILE:
            action.help = f"a YAML file of {action.dest}.* keys"


def _is_text(action: Action) -> bool:
    """Whether an option takes free text (a name a registry checks later, not a Literal)."""
    hint = getattr(action, "_typehint", action.type)
    return hint is str or hint == str | None


def show_trainer(parser: ArgumentParser, shown: dict[str, str], description: str) -> None:
    """Hide the trainer.* keys not in `shown` ({key: help}) from the help; `description`
    becomes the group's."""
    for action in parser._actions:
        key = action.dest
        if not key.startswith("trainer.") or not action.option_strings:
            continue
        if key in shown:
            action.help = shown[key]
            setattr(action, _WORDS, "")  # the help says what it takes
        else:
            setattr(action, _HIDDEN, True)  # not help=SUPPRESS: jsonargparse would not dump it
    group = getattr(parser, "groups", {}).get("trainer")
    if group is not None:
        group.title, group.description = "trainer.*", description


# The trainer.* keys the configs, the README and the checks of this package name, with what
# they take; every other Trainer argument is accepted but left out of the help.
TRAINER_SHOWN = {
    "trainer.accelerator": "where to train: auto (a GPU when there is one), cpu, gpu or mps",
    "trainer.devices": "how many devices (or a list of their indices), or auto",
    "trainer.strategy": "Lightning's distributed strategy by name (auto, ddp, ...)",
    "trainer.precision": "32-true, bf16-mixed, 16-mixed, 64-true, ...; null: bf16-mixed (or "
    "16-mixed) on CUDA, 32-true elsewhere; bf16-mixed on a CPU without native bf16 trains in "
    "32-true",
    "trainer.max_epochs": "epochs of a centralized run (a federated run trains "
    "federated.local_epochs per round instead)",
    "trainer.log_every_n_steps": "training steps between logged training metrics; null: 50",
    "trainer.deterministic": "true: deterministic algorithms only (warn: where there are); "
    "null: as Lightning decides",
    "trainer.gradient_clip_val": "clip the gradients' norm to this; null: no clipping",
    "trainer.accumulate_grad_batches": "batches whose gradients add up before each optimizer step",
    "trainer.enable_progress_bar": "Lightning's progress bar; null: shown",
    "trainer.enable_model_summary": "Lightning's table of the model's layers; null: shown",
}
TRAINER_NOTE = (
    "Arguments of Lightning's Trainer (each federated client's too). Only those the configs set "
    "are listed: any other argument of lightning.pytorch.Trainer is taken the same way "
    "(--trainer.NAME VALUE, or under trainer: in a --config; --print_config lists them all "
    "with their values): https://lightning.ai/docs/pytorch/stable/common/trainer.html. The run "
    "sets logger, callbacks, default_root_dir and enable_checkpointing itself."
)


def describe_fit(parser: ArgumentParser, groups: dict[str, type]) -> None:
    """The fit parser's help: `describe` its config groups, `show_trainer` the shown keys."""
    describe(parser, groups)
    show_trainer(parser, TRAINER_SHOWN, TRAINER_NOTE)
    parser.usage = (
        "%(prog)s [--config FILE] [--GROUP.KEY VALUE ...]\n       %(prog)s --resume RUN_DIR "
        "[--federated.rounds N | --trainer.max_epochs N]"
    )


def listed(action: Action) -> bool:
    """Whether `--help` lists the option."""
    return action.help is not SUPPRESS and not getattr(action, _HIDDEN, False)


def type_text(hint: object) -> str | None:
    """What a value of type `hint` may be, in words; None where the choices are shown instead
    (Literal, bool) and "%(type)s" (jsonargparse's name of the type) for the rest."""
    if hint is type(None):
        return "null"
    if hint is bool or typing.get_origin(hint) is typing.Literal:
        return None
    if isinstance(hint, type) and issubclass(hint, (int, float)):
        return _number_text(hint)
    if hint is str:
        return "text"
    if hint is dict:
        return "mapping"
    if typing.get_origin(hint) is list and len(typing.get_args(hint)) == 1:
        inner = type_text(typing.get_args(hint)[0])
        return None if inner is None else f"list of {inner}"
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        parts = [_choice_text(arg) for arg in typing.get_args(hint)]
        if all(part is not None and "%(" not in part for part in parts):
            return ", or ".join(typing.cast(list, parts))
    return "%(type)s"


def _choice_text(hint: object) -> str | None:
    """A member of a union in words, a Literal's choices included."""
    if typing.get_origin(hint) is typing.Literal:
        return " or ".join(str(c) for c in typing.get_args(hint))
    if hint is bool:
        return "true or false"
    return type_text(hint)


def _number_text(kind: type) -> str:
    """ "integer > 0 and <= 512" for a ranged int (pneumonia.core.bounds), "number" for float."""
    limits = [f"{_SYMBOLS.get(op, op)} {b}" for op, b in getattr(kind, "_restrictions", ())]
    name = "integer" if issubclass(kind, int) else "number"
    return " ".join([name, " and ".join(limits)]).strip()


class HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help, with types in words and the description in paragraphs."""

    def _get_help_string(self, action: Action) -> str:
        if getattr(action, "_jsonargparse_preexpanded_help", False) or action.help is SUPPRESS:
            return super()._get_help_string(action)
        words = getattr(action, _WORDS, None)
        hint = getattr(action, "_typehint", None)
        if words is None and hint is not None:
            words = type_text(hint)
        if words is None and hint is None:
            return super()._get_help_string(action)
        parts = ["required"] if action.required else []
        parts += [words] if words else []
        if isinstance(action.default, bool):  # as YAML and the choices write it
            parts.append(f"default: {str(action.default).lower()}")
        elif action.default is not SUPPRESS and not action.required:
            parts.append("default: %(default)s")
        return f"{action.help or ''} ({', '.join(parts)})".strip()

    def add_argument(self, action: Action) -> None:
        if listed(action):
            super().add_argument(action)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for paragraph in text.split("\n\n"):
            lines = paragraph.splitlines()
            if lines and all(line.startswith("    ") for line in lines if line.strip()):
                paragraphs.append("\n".join(indent + line for line in lines))  # an example
            else:
                paragraphs.append(super()._fill_text(paragraph, width, indent))
        return "\n\n".join(paragraphs)
