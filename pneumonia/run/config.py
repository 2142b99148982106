"""Command-line and YAML configuration, parsed by jsonargparse from the stages' dataclasses.

Groups mirror the code: data.* (DataConfig), model.* (ModelConfig), optim.* (OptimConfig),
federated.* (FederatedConfig), trainer.* (Lightning Trainer arguments). Any key can come from
`--config FILE` and be overridden on the command line as `--group.key value`. A key's help is
its config field's comment (`pneumonia.run.helptext`).
"""

from __future__ import annotations

import functools
import logging
import re
import sys
import typing
import warnings
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from pneumonia.core.bounds import NonNegativeFloat, NonNegativeInt, OpenUnitInterval, Seed
from pneumonia.core.errors import UserError, first_line
from pneumonia.run.helptext import HelpFormatter, describe_fit

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

log = logging.getLogger(__name__)

# The dataclass groups of the fit config (trainer.* stays a namespace).
CONFIG_GROUPS = ("data", "model", "optim", "loss", "federated", "privacy", "early_stopping")
# The fit entry point owns these Trainer arguments: where runs are written and how.
TRAINER_MANAGED = {"logger", "callbacks", "default_root_dir", "enable_checkpointing"}
# `python -m pneumonia.fit` with no --config behaves like `make fit`: the repository's default.
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"
# Checkpoint selection. Clean validation saturates (specificity near 1), so its accuracy picks
# by noise in recall; log loss is a proper scoring rule, and val_shift/* scores the same
# patients under acquisition shifts (pneumonia.data.shifts).
MONITORS = (
    "val/accuracy",
    "val/auroc",
    "val/f1",
    "val/loss",
    "val_shift/loss",
    "val_shift/auroc",
    "val_shift/accuracy",
)


@dataclass
class EarlyStoppingConfig:
    """Stop when the monitored metric (`monitor`) has not improved by more than `min_delta`
    for `patience` validations: epochs (Lightning's EarlyStopping) or federated rounds (the
    same rule, by round). patience 0: train the whole schedule."""

    patience: NonNegativeInt = 0  # validations without improvement before the run stops; 0: off
    min_delta: NonNegativeFloat = 0.0  # the least change of the monitored metric that counts


def config_groups() -> dict[str, type]:
    """The fit config's groups and their dataclasses, in config.yaml's order. Their modules load
    here, not at import: a tool that only needs `tool_parser` starts without Lightning."""
    from pneumonia.data.sources import DataConfig
    from pneumonia.federated.options import FederatedConfig
    from pneumonia.models.factory import ModelConfig
    from pneumonia.training.losses import LossConfig
    from pneumonia.training.module import OptimConfig
    from pneumonia.training.privacy import PrivacyConfig

    return {
        "data": DataConfig,
        "model": ModelConfig,
        "optim": OptimConfig,
        "loss": LossConfig,
        "early_stopping": EarlyStoppingConfig,
        "federated": FederatedConfig,
        "privacy": PrivacyConfig,
    }


def build_fit_parser() -> ArgumentParser:
    """The parser of `python -m pneumonia.fit`: every key described (`helptext.describe_fit`).
    The config groups' modules load here, not at import: a tool that only needs
    `tool_parser` starts without Lightning."""
    import lightning as L

    parser = ArgumentParser(
        prog="python -m pneumonia.fit",
        exit_on_error=False,
        allow_abbrev=False,
        description="Train one classifier, centrally or federated, into a run directory.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--config",
        action=ActionConfigFile,
        help="a YAML file (or YAML text) of any keys below; several are read in order",
    )
    parser.add_argument("--experiment", type=str, default="default", help="runs/<experiment>/")
    parser.add_argument("--seed", type=Seed, default=0, help="fixes split, sampling and init")
    parser.add_argument(
        "--run_dir",
        type=str | None,
        default=None,
        help="run directory (default runs/<experiment>/version_N)",
    )
    parser.add_argument(
        "--runs_root", type=str, default="runs", help="the folder of runs/<experiment>/"
    )
    parser.add_argument(
        "--monitor",
        type=Literal[MONITORS],
        default="val/accuracy",
        help="validation metric that picks checkpoints/best.ckpt",
    )
    parser.add_argument(
        "--positive_class",
        type=Literal["PNEUMONIA", "NORMAL"],
        default="PNEUMONIA",
        help="recall is the sensitivity to this class",
    )
    parser.add_argument(
        "--threshold",
        type=OpenUnitInterval | Literal["youden"],
        default=0.5,
        help="decision threshold on P(positive): a number, or youden (the best-checkpoint's "
        "threshold maximising sensitivity + specificity on the validation images)",
    )
    parser.add_argument(
        "--figures_every",
        type=NonNegativeInt,
        default=1,
        help="a centralized run's TensorBoard figures of the validation sets (confusion matrix, "
        "ROC, reliability) every N epochs; 0: only the reported model's, at the end (each set "
        "of figures takes about a second to draw)",
    )
    groups = config_groups()
    for group, cls in groups.items():
        parser.add_argument(f"--{group}", type=cls, default=cls())
    parser.add_class_arguments(L.Trainer, "trainer", skip=TRAINER_MANAGED, instantiate=False)
    parser.set_defaults({"trainer.max_epochs": 10})  # Lightning's own default is 1000
    describe_fit(parser, groups)
    return parser


def with_default_config(argv: list[str]) -> list[str]:
    """Prepend configs/default.yaml when no --config is given and the file exists."""
    if (
        any(a == "--config" or a.startswith("--config=") for a in argv)
        or not DEFAULT_CONFIG.is_file()
    ):
        return argv
    return ["--config", str(DEFAULT_CONFIG), *argv]


def tool_parser(prog: str, doc: str) -> ArgumentParser:
    """The parser of a `python -m pneumonia.X` tool: errors come back to `parse_args` (one
    line), no abbreviated options, its module docstring as description (its paragraphs kept)
    and types in words (`helptext.HelpFormatter`)."""
    return ArgumentParser(
        prog=prog,
        exit_on_error=False,
        allow_abbrev=False,
        description=doc.strip(),
        formatter_class=HelpFormatter,
    )


def add_threshold_option(parser: ArgumentParser) -> None:
    """--threshold: a number in (0, 1), or "checkpoint" (the run's chosen threshold)."""
    parser.add_argument(
        "--threshold",
        type=OpenUnitInterval | Literal["checkpoint"],
        default="checkpoint",
        help="decision threshold on P(positive): a number in (0, 1), or checkpoint (the one "
        "the run chose, 0.5 unless it was told otherwise)",
    )


def add_device_option(parser: ArgumentParser) -> None:
    """--device cpu|cuda for the tools that score a trained model."""
    parser.add_argument(
        "--device", type=Literal["cpu", "cuda"], default="cpu", help="where the model runs"
    )


def check_device(device: str) -> None:
    """A one-line error for --device cuda on a machine without CUDA."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: this machine has no CUDA device: use cpu")


def threshold_override(args: Namespace) -> float | None:
    """The --threshold to decide at, or None for the checkpoint's own."""
    return None if args.threshold == "checkpoint" else float(args.threshold)


def parse_args(parser: ArgumentParser, argv: list[str] | None = None) -> Namespace:
    """Parse, turning jsonargparse's multi-line errors into one UserError line."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        return parser.parse_args(argv)
    except Exception as err:  # jsonargparse raises ArgumentError, or ValueError for bad YAML
        raise UserError(_one_line(parser, str(err), argv)) from None


def check_config_sources(parser: ArgumentParser, argv: list[str]) -> None:
    """Every config source, read before jsonargparse reads it (its parse imports any class a
    value names, so a refusal after it comes too late): each `--config` must be YAML text
    holding a mapping of keys, groups holding mappings, no key given twice; neither a
    `--config` nor the command line may name a class (`refuse_classes`). One line naming the
    file and the key otherwise (jsonargparse would say "Unexpected config", take a group given
    as a number for its defaults, or keep the last of two values)."""
    groups = _groups(parser)
    for source in _option_values(argv, "config"):
        name, tree = read_config(source)
        if not isinstance(tree, dict) or not tree:
            what = "empty" if tree is None else f"a {type(tree).__name__}"
            raise UserError(f"{name} is {what}: a config is a mapping of keys, e.g. 'seed: 0'")
        for key, value in _group_values(tree, groups):
            if not isinstance(value, dict):
                raise UserError(
                    f"{name}: {key} is a group of keys, not {value!r}: e.g. {key}: {{...}}"
                )
        if tree.get("config") is not None:  # jsonargparse would read that file unchecked
            raise UserError(
                f"{name}: config {tree['config']} names another config: give each file its "
                "own --config"
            )
        refuse_classes(f"{name}: ", tree)
    for key, value in _command_line(argv):
        refuse_classes("", _nest(key, _cli_value(key, value)), "--")


def read_config(source: str) -> tuple[str, object]:
    """(how to name it, its YAML tree) of a `--config` value: a file or YAML text."""
    path, is_file = Path(source), _is_file(source)
    if not is_file and "\n" not in source and ":" not in source:
        raise UserError(f"config file {source} not found: --config takes a YAML file")
    name = str(path) if is_file else "the --config text"
    try:
        text = path.read_text() if is_file else source
        return name, strict_yaml(text, name)
    except UnicodeDecodeError:
        raise UserError(f"{name} is not text: --config takes a YAML file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or first_line(err, 120)
        raise UserError(f"{name} is not valid YAML{where}: {problem}") from None


def strict_yaml(text: str, name: str) -> object:
    """YAML's value of `text`, refusing a key given twice in one mapping (which YAML loaders
    resolve silently, the last one winning) in one line naming `name`, the key and its lines."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        size, duplicate = _expanded_size(root, {}), _duplicate_key(root)
    except RecursionError:  # PyYAML's composer recurses once per level of nesting
        raise UserError(
            f"{name} nests values too deeply to read: a config is a few levels deep"
        ) from None
    if size > MAX_CONFIG_VALUES:  # aliases of aliases: a "billion laughs"
        raise UserError(
            f"{name} holds more than {MAX_CONFIG_VALUES:,} values, its YAML aliases written "
            "out: a config is a few hundred keys"
        )
    if duplicate is not None:
        key, first, second = duplicate
        lines = f"lines {first} and {second}" if first < second else f"both on line {first}"
        raise UserError(f"{name}: {key} is given twice ({lines}): keep one")
    return yaml.safe_load(text)


def _expanded_size(node: yaml.Node | None, sizes: dict[int, int]) -> int:
    """How many nodes `node` stands for with every alias written out (each node counted once:
    an alias is the same node object again)."""
    if id(node) not in sizes:
        children: list = []
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        sizes[id(node)] = 1 + sum(_expanded_size(child, sizes) for child in children)
    return sizes[id(node)]


def _duplicate_key(node: yaml.Node | None, prefix: str = "") -> tuple[str, int, int] | None:
    """(dotted key, its first line, its second line) of the first key given twice."""
    if isinstance(node, yaml.SequenceNode):
        found = (_duplicate_key(item, prefix) for item in node.value)
        return next((d for d in found if d is not None), None)
    if not isinstance(node, yaml.MappingNode):
        return None
    lines: dict[str, int] = {}
    for key, value in node.value:
        if key.tag == "tag:yaml.org,2002:merge" or not isinstance(key, yaml.ScalarNode):
            continue
        dotted, line = f"{prefix}{key.value}", key.start_mark.line + 1
        if dotted in lines:
            return dotted, lines[dotted], line
        lines[dotted] = line
        duplicate = _duplicate_key(value, f"{dotted}.")
        if duplicate is not None:
            return duplicate
    return None


# A resolved fit config holds about 300 values; aliases may not multiply one past this.
MAX_CONFIG_VALUES = 100_000
# Keys by which jsonargparse names a class to import (and its arguments).
CLASS_KEYS = ("class_path", "init_args", "dict_kwargs")
# A word of Lightning's own for a class-valued Trainer argument ("cpu", "ddp", "simple"):
# jsonargparse imports a value with a dot in it as a module path.
_NAME = re.compile(r"[A-Za-z0-9_-]+")
LIGHTNING_WORDS = {
    "trainer.accelerator": "cpu",
    "trainer.strategy": "auto",
    "trainer.profiler": "simple",
}


@functools.cache
def class_valued_trainer_keys() -> frozenset[str]:
    """The trainer.* keys whose Lightning type admits a class (accelerator, strategy,
    profiler, plugins), read from Trainer's signature: what a config could make it import."""
    import lightning as L

    hints = typing.get_type_hints(L.Trainer.__init__)
    return frozenset(
        f"trainer.{name}"
        for name, hint in hints.items()
        if name not in TRAINER_MANAGED and name != "return" and _names_a_class(hint)
    )


def _names_a_class(hint: object) -> bool:
    if typing.get_origin(hint) is Literal:
        return False
    if typing.get_origin(hint) is None:
        return isinstance(hint, type) and hint.__module__ not in ("builtins", "datetime")
    return any(_names_a_class(arg) for arg in typing.get_args(hint))


def refuse_classes(where: str, tree: object, dash: str = "", prefix: str = "") -> None:
    """No config value names a class: a `class_path` (anywhere), or a trainer.* value that is
    not one of Lightning's words, would be imported by the parse, and a module planted beside a
    shared config or run directory would run (the working directory is on the import path).
    `where`: "FILE: " or ""; `dash`: "--" for the command line's keys."""
    if isinstance(tree, str) and tree.lstrip()[:1] in ("{", "["):
        # jsonargparse reads such a string as YAML again
        tree = _yaml_or_none(tree, f"{where}{dash}{prefix.rstrip('.')}")
    if isinstance(tree, list):
        for item in tree:
            refuse_classes(where, item, dash, prefix)
    if not isinstance(tree, dict):
        return
    for key, value in tree.items():
        name = str(key).rstrip("+")  # jsonargparse's "key+" appends to a list: the same key
        dotted = f"{prefix}{name}"
        trainer_class = dotted in class_valued_trainer_keys() and not _lightning_word(value)
        if name in CLASS_KEYS or trainer_class:
            word = LIGHTNING_WORDS.get(dotted)
            instead = f", or give one of Lightning's names (e.g. {word})" if word else ""
            raise UserError(
                f"{where}{dash}{dotted} names a class ({_shown(value)}), which a config never "
                f"imports: drop {dash}{dotted}{instead}"
            )
        refuse_classes(where, value, dash, f"{dotted}.")


def _lightning_word(value: object) -> bool:
    """Whether a class-valued trainer.* value is one jsonargparse imports nothing for."""
    if isinstance(value, str):
        return _NAME.fullmatch(value) is not None
    return not isinstance(value, (dict, list))


def _shown(value: object) -> str:
    if isinstance(value, dict) and "class_path" in value:
        value = value["class_path"]
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _yaml_or_none(text: str, name: str) -> object:
    try:
        return strict_yaml(text, name)
    except yaml.YAMLError:
        return None


def _option_values(argv: list[str], option: str) -> list[str]:
    """The values of `--option VALUE` and `--option=VALUE` on a command line."""
    values = [v for a, v in zip(argv, argv[1:], strict=False) if a == f"--{option}"]
    return values + [a.split("=", 1)[1] for a in argv if a.startswith(f"--{option}=")]


def _command_line(argv: list[str]) -> list[tuple[str, str | None]]:
    """(dotted key, value or None) of every `--key VALUE`, `--key=VALUE` or flag, less
    --config and --resume (read as files)."""
    options: list[tuple[str, str | None]] = []
    for i, arg in enumerate(argv):
        if not arg.startswith("--"):
            continue
        key, eq, after = arg[2:].partition("=")
        value: str | None = after
        if not eq:
            following = argv[i + 1] if i + 1 < len(argv) else None
            value = None if following is None or following.startswith("--") else following
        if key not in ("config", "resume"):
            options.append((key, value))
    return options


def _cli_value(key: str, value: str | None) -> object:
    """A command-line value as jsonargparse reads it (YAML), a key given twice refused."""
    if value is None:
        return None
    try:
        return strict_yaml(value, f"--{key}")
    except yaml.YAMLError:
        return value


def _nest(key: str, value: object) -> dict:
    """{"a": {"b": value}} for "a.b"."""
    *outer, last = key.split(".")
    nested: dict = {last: value}
    for part in reversed(outer):
        nested = {part: nested}
    return nested


def _is_file(source: str) -> bool:
    """Whether a --config value names a file (YAML text can be too long to be a path)."""
    try:
        return "\n" not in source and Path(source).is_file()
    except OSError:
        return False


def _groups(parser: ArgumentParser) -> set[str]:
    known = set(parser.get_defaults().keys())  # noqa: SIM118 (a Namespace iterates no keys)
    return {k.rsplit(".", i)[0] for k in known for i in range(1, k.count(".") + 1)}


def _group_values(tree: dict, groups: set[str], prefix: str = "") -> list[tuple[str, object]]:
    """(group key, its value) for every group named in a config tree."""
    out = []
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if key in groups:
            out.append((key, value))
            if isinstance(value, dict):
                out += _group_values(value, groups, f"{key}.")
    return out


# jsonargparse's words for a value outside a range of pneumonia.core.bounds.
_OUT_OF_RANGE = re.compile(
    r'Parser key "(?P<key>[\w.]+)":\s+Not of type \w+: (?P<value>\S+) does not conform to '
    r"restriction (?P<rule>.+)"
)


_LITERAL = re.compile(
    r'Parser key "(?P<key>[\w.]+)":\s+Expected a typing\.Literal\[(?P<choices>[^\]]*)\]\. '
    r"Got value: (?P<value>\S+)$"
)
_UNION = re.compile(
    r'Parser key "(?P<key>[\w.]+)": Does not validate against any of the Union subtypes.*'
    r"Given value: (?P<value>\S+)$"
)
_UNION_RULE = re.compile(r"does not conform to restriction (?P<rule>.+?) - ")


def _rule(rule: str) -> str:
    """jsonargparse's "v>0 and v<=1" as "> 0 and <= 1"."""
    return re.sub(r"\bv\s*([<>]=?)\s*", r"\1 ", rule)


def _one_line(parser: ArgumentParser, message: str, argv: list[str]) -> str:
    text = " ".join(line.strip() for line in message.strip().splitlines() if line.strip())
    match = _OUT_OF_RANGE.search(text)
    if match:  # the key, the value, the range: "data.batch_size 0 must be > 0"
        return f"{match['key']} {match['value']} must be {_rule(match['rule'])}"
    match = _LITERAL.search(text)
    if match:  # an unknown name: "loss.name 'foo' is not one of: cross_entropy, ..."
        choices = ", ".join(re.findall(r"'([^']*)'", match["choices"]))
        return f"{match['key']} {match['value']!r} is not one of: {choices}"
    match = _UNION.search(text)
    if match:  # a range or null (or a word): "federated.server_lr -1 must be > 0, or null"
        rule = _UNION_RULE.search(text)
        alternatives = ["null" if "NoneType" in text else ""]
        alternatives += re.findall(r"Literal\['(\w+)'\]", text)
        words = ", or ".join(a for a in dict.fromkeys(alternatives) if a)
        if rule:
            return f"{match['key']} {match['value']} must be {_rule(rule['rule'])}, or {words}"
        return f"{match['key']} {match['value']} must be a number, or {words}"
    files = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    if files and "parsing config" in text:
        text = f"{', '.join(files)}: {text}"
    unknown = _unknown_key(parser, argv)
    if unknown is not None:
        group = unknown.rsplit(".", 1)[0] if "." in unknown else ""
        text += f". Valid keys: {_valid_keys(parser, group)}"
    return text


def _unknown_key(parser: ArgumentParser, argv: list[str]) -> str | None:
    """The first option on the command line or in a --config YAML that the parser does not
    know: found from the keys themselves, not from the wording of jsonargparse's message."""
    known = set(parser.get_defaults().keys())  # noqa: SIM118 (a Namespace iterates no keys)
    groups = _groups(parser)
    keys = [a[2:].split("=", 1)[0] for a in argv if a.startswith("--")]
    for i, arg in enumerate(argv[:-1]):
        if arg == "--config":
            keys += _yaml_keys(argv[i + 1], groups)
    for key in keys:
        if key not in known | groups | {"config", "help", "print_config", "resume"}:
            return key
    return None


def _yaml_keys(source: str, groups: set[str], prefix: str = "") -> list[str]:
    """Dotted keys of a config (a file or YAML text), descending only into known groups."""
    try:
        tree = yaml.safe_load(Path(source).read_text() if _is_file(source) else source)
    except (OSError, ValueError, yaml.YAMLError):
        return []
    return _flatten(tree, groups, prefix)


def _flatten(tree: object, groups: set[str], prefix: str) -> list[str]:
    if not isinstance(tree, dict):
        return []
    keys = []
    for name, value in tree.items():
        key = f"{prefix}{name}"
        keys += _flatten(value, groups, f"{key}.") if key in groups else [key]
    return keys


def _valid_keys(parser: ArgumentParser, group: str) -> str:
    """The keys directly under `group` ("" for the top level)."""
    prefix = f"{group}." if group else ""
    names = parser.get_defaults().keys()  # noqa: SIM118 (iterating a Namespace gives no keys)
    keys = {k[len(prefix) :].split(".")[0] for k in names if k.startswith(prefix)}
    return ", ".join(sorted(keys - {"config"}))


def to_yaml(parser: ArgumentParser, cfg: Namespace) -> str:
    """The resolved configuration, every default filled in, as YAML."""
    return parser.dump(cfg, skip_none=False)


# What `--resume RUN_DIR` may take besides: more rounds or epochs, which
# pneumonia.run.rundir.check_resume_config accepts where the run's schedule allows them.
RESUME_LONGER = ("federated.rounds", "trainer.max_epochs")


def resume_longer(argv: list[str]) -> list[str]:
    """The `--federated.rounds N` and `--trainer.max_epochs N` given beside --resume."""
    options = [(k, v) for k, v in _command_line(argv) if k in RESUME_LONGER and v is not None]
    return [arg for key, value in options for arg in (f"--{key}", value)]


def _others(argv: list[str], keys: tuple[str, ...]) -> list[str]:
    """What `argv` holds besides `--key VALUE` and `--key=VALUE` of `keys`."""
    rest, i = [], 0
    while i < len(argv):
        key, eq, _ = argv[i][2:].partition("=") if argv[i].startswith("--") else ("", "", "")
        valued = eq or (i + 1 < len(argv) and not argv[i + 1].startswith("--"))
        if key in keys and valued:
            i += 1 if eq else 2
        else:
            rest.append(argv[i])
            i += 1
    return rest


def resume_dir(argv: list[str]) -> Path | None:
    """RUN_DIR of `--resume RUN_DIR` (which takes no other options but `resume_longer`'s), or
    None."""
    if not any(a == "--resume" or a.startswith("--resume=") for a in argv):
        return None
    values = _option_values(argv, "resume")
    if len(values) != 1 or _others(argv, ("resume", *RESUME_LONGER)):
        raise UserError(
            "--resume RUN_DIR takes no other options than --federated.rounds N or "
            "--trainer.max_epochs N (to train longer): the run continues with its own config.yaml"
        )
    path = Path(values[0])
    if not (path / "config.yaml").is_file():
        raise UserError(f"{path} holds no config.yaml: --resume needs a run directory of fit")
    return path


@functools.cache
def fit_parser() -> ArgumentParser:
    """One parser for every parse in this process: building it takes 0.4 s (jsonargparse reads
    every config dataclass), and a comparison parses a config per entry."""
    return build_fit_parser()


def parse_fit_config(argv: list[str]) -> tuple[Namespace, str, Path | None]:
    """`python -m pneumonia.fit`'s arguments as (the instantiated config, its resolved YAML,
    the run directory to resume or None). `--config` takes a file or YAML text."""
    parser = fit_parser()
    resume = resume_dir(argv)
    if resume is not None:
        argv = ["--config", str(resume / "config.yaml"), *resume_longer(argv)]
    argv = with_default_config(argv)
    check_config_sources(parser, argv)
    raw = parse_args(parser, argv)
    # Groups become their dataclasses; trainer.* stays a namespace.
    cfg = parser.instantiate(raw)
    for group in CONFIG_GROUPS:
        plain_numbers(cfg[group])
    cfg.seed = int(cfg.seed)
    cfg.threshold = cfg.threshold if isinstance(cfg.threshold, str) else float(cfg.threshold)
    return cfg, to_yaml(parser, raw), resume


def plain_numbers(config: DataclassInstance) -> None:
    """Turn the parser's range-checked numbers (pneumonia.core.bounds: subclasses of int and float)
    back into int and float, in place, through nested dataclasses: checkpoints carry these
    values and must load with torch.load(weights_only=True), which knows only the builtins."""
    for f in fields(config):
        value = getattr(config, f.name)
        if is_dataclass(value) and not isinstance(value, type):  # a config group in a group
            plain_numbers(value)
        elif isinstance(value, int) and type(value) not in (int, bool):
            setattr(config, f.name, int(value))
        elif isinstance(value, float) and type(value) is not float:
            setattr(config, f.name, float(value))


def uses_cuda(trainer_args: dict) -> bool:
    """Whether Lightning will train on a CUDA device with these trainer.* options."""
    import torch

    accelerator = trainer_args.get("accelerator", "auto")
    return torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")


def monitor_mode(monitor: str) -> str:
    """ "min" for a loss, "max" for every other monitored metric."""
    return "min" if monitor.endswith("loss") else "max"


def trainer_arguments(cfg: Namespace) -> dict:
    """The user's trainer.* options, with mixed precision by default on CUDA only, and
    bf16-mixed on a CPU only where it computes bf16 natively (`cpu_precision`)."""
    import torch

    args = dict(cfg.trainer)
    if args.get("precision") is None:
        if uses_cuda(args):
            args["precision"] = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
        else:
            args["precision"] = "32-true"
    args["precision"] = cpu_precision(args)
    return args


CPU_BF16_FALLBACK = (
    "trainer.precision bf16-mixed: this CPU has no native bf16 (AVX512-BF16 or AMX); "
    "training in 32-true"
)


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX); elsewhere torch only
    emulates it (`python bench/train_step.py` measures float32 against bf16 on a machine)."""
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def cpu_precision(args: dict) -> object:
    """The precision to train in: bf16-mixed (or its alias bf16) on a CPU without native bf16
    becomes 32-true, said in one line once per process (preflight's, or a Flower node's first
    round); anything else stays. config.yaml keeps what the user asked."""
    import torch

    precision = args.get("precision")
    on_cpu = str(args.get("accelerator", "auto")) == "cpu" or not (
        uses_cuda(args) or torch.backends.mps.is_available()
    )
    if str(precision) in ("bf16-mixed", "bf16") and on_cpu and not native_cpu_bf16():
        say_once(CPU_BF16_FALLBACK)
        return "32-true"
    return precision


@functools.cache
def say_once(line: str) -> None:
    """Warn in a line the first time this process asks (trainer_arguments runs for every
    Trainer; a Flower node builds its client each round)."""
    log.warning(line)


def check_monitor(monitor: str, shift_enabled: bool) -> None:
    if monitor.startswith("val_shift/") and not shift_enabled:
        raise UserError(
            f"monitor {monitor} needs the shift validation: set data.shift.enabled true or "
            f"monitor val/loss"
        )


def check_trainer(cfg: Namespace) -> None:
    """trainer.* options that Lightning would accept and a run cannot use, and the ones it
    would refuse only later (an accelerator that is not there): one line each, now."""
    import lightning as L
    import torch

    args = trainer_arguments(cfg)
    epochs = args.get("max_epochs")
    if epochs is None or epochs < 1:
        raise UserError(
            f"trainer.max_epochs {epochs} must be at least 1: a run trains for a fixed number "
            f"of epochs (federated runs: federated.local_epochs per round)"
        )
    if args.get("log_every_n_steps") is not None and args["log_every_n_steps"] < 1:
        raise UserError(f"trainer.log_every_n_steps {args['log_every_n_steps']} must be >= 1")
    accelerator = str(args.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(
            f"trainer.accelerator {accelerator}: this machine has no CUDA device: use auto or cpu"
        )
    quiet = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = quiet.level
    try:  # Lightning's own checks: accelerator, devices, precision, limits
        quiet.setLevel(logging.WARNING)  # its "GPU available" lines come with the real Trainer
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = L.Trainer(**args, logger=False, enable_checkpointing=False)
    except Exception as err:  # MisconfigurationException, ValueError, RuntimeError, ...
        raise UserError(f"trainer.*: {first_line(err, 200)}") from None
    finally:
        quiet.setLevel(level)
    if trainer.world_size > 1:
        check_distributed(cfg, trainer.world_size, trainer.strategy)


# Lightning's DDP strategies that start their processes other than by running the command
# again: they pickle the run into each process, which its open run directory lock and signal
# handlers do not survive.
SPAWNING = ("spawn", "fork", "notebook")


def check_distributed(cfg: Namespace, processes: int, strategy: object) -> None:
    """What a central run on several processes (trainer.devices x trainer.num_nodes) cannot
    do, refused before any data is read."""
    from lightning.pytorch.strategies import DDPStrategy

    name = str(dict(cfg.trainer).get("strategy", "auto"))  # as given: a name or an object
    where = f"trainer.devices x num_nodes gives {processes} processes"
    if cfg.federated.enabled:
        raise UserError(
            f"{where}: a federated run trains each client on one device; set trainer.devices 1 "
            "(federated.engine simulation trains a round's clients in parallel)"
        )
    if cfg.privacy.enabled:
        raise UserError(
            f"{where}: privacy.enabled trains on one device (one accountant, one noise draw "
            "per step); set trainer.devices 1"
        )
    if not isinstance(strategy, DDPStrategy):
        raise UserError(
            f"trainer.strategy {name}: a central run on several devices uses ddp (FSDP and "
            "DeepSpeed shard a model too big for one device; these models fit one)"
        )
    if any(word in name for word in SPAWNING):
        raise UserError(
            f"trainer.strategy {name}: use ddp, which starts each process as a copy of the "
            "command (the spawned processes cannot inherit the run's open files)"
        )
    if cfg.model.norm == "bn" and not dict(cfg.trainer).get("sync_batchnorm"):
        log.warning(
            f"model.norm bn on {processes} processes: each normalises by its share of the "
            "batch; trainer.sync_batchnorm true normalises over the whole batch, as one "
            "device does"
        )
    if cfg.data.batch_size < processes:
        raise UserError(
            f"data.batch_size {cfg.data.batch_size} is the global batch, shared by the "
            f"{processes} processes: make it at least {processes}"
        )


def check_early_stopping(cfg: Namespace) -> None:
    """Early stopping ends a run before its last epoch or round: a rule that needs the last
    one (the average of the last K rounds) cannot follow it."""
    if cfg.early_stopping.patience and cfg.federated.enabled and cfg.federated.average_rounds:
        raise UserError(
            "early_stopping.patience with federated.average_rounds: the average of the last "
            "rounds needs the last round; set one of them to 0"
        )


def check_threshold(threshold: float | str) -> None:
    if threshold != "youden" and not 0.0 < float(threshold) < 1.0:
        raise UserError(f"threshold {threshold} must lie strictly between 0 and 1, or be youden")
