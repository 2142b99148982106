"""A comparison config, read and checked: every entry becomes the exact `fit` configuration it
will train with, and every problem is found before the first entry trains.

    name: options_study               # reports/<name>/ (default: the file's stem)
    description: one line for the report
    shared: {data: ..., optim: ..., trainer: ..., federated: ...}   # fit options for all
    reference: default                # the entry every other is compared against (default:
                                      # the first entry, when any entry has a family)
    entries:
      - name: default                 # the entry's run directory and file names
        label: Default recipe         # how tables and plots name it (default: name)
      - name: sgd
        label: SGD
        family: optimizer             # optional: the report groups entries by family
        set: {optim: {name: sgd}}     # fit options of this entry, merged over shared
    sweep: {x: data.batch_size, line: model.norm, file: batch_size.png}   # optional plot

An entry with `leave_out: K` (a federated one) is a leave-one-site-out pair: site K trains
nowhere and every image of it is scored (`held_out`): `<name>_federated` federates the other
sites and trains each of them alone (federated.cross_site: the single-site models), and
`<name>_pooled` trains one client on their pooled images (centralized over the rest).
"""

from __future__ import annotations

import copy
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from jsonargparse import Namespace

from pneumonia.core.errors import UserError
from pneumonia.federated.options import clients_per_round
from pneumonia.metrics.classification import SCALARS
from pneumonia.run.config import parse_fit_config, strict_yaml
from pneumonia.run.job import preflight

TOP_KEYS = {"name", "description", "shared", "entries", "sweep", "reference"}
ENTRY_KEYS = {"name", "label", "family", "set", "leave_out"}
SWEEP_KEYS = {"x", "line", "file", "metric"}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class Entry:
    """One row of the comparison: its label, fit configuration and run directory."""

    name: str
    label: str
    cfg: Namespace  # the instantiated fit config
    resolved: str  # the resolved YAML fit writes as config.yaml (the cache key's source)
    argv: list[str]  # what `python -m pneumonia.fit` is called with
    run_dir: Path
    parameters: int
    family: str = ""  # the report's group of one-change entries (activation, loss, ...)

    @property
    def federated(self) -> bool:
        return bool(self.cfg.federated.enabled)

    @property
    def steps(self) -> int:
        """Epochs (centralized) or rounds (federated): the points on its curves."""
        return self.cfg.federated.rounds if self.federated else self.cfg.trainer.max_epochs

    @property
    def passes(self) -> float:
        """Passes over the training images per step: 1 for an epoch; E x m / J for a round
        (m = max(round(C x J), 1) clients sampled of J: C as the sampler rounds it)."""
        fed = self.cfg.federated
        if not self.federated:
            return 1.0
        if fed.partition == "sites":  # J is the number of hospital folders: C as given
            return fed.local_epochs * fed.fraction
        return fed.local_epochs * clients_per_round(fed.fraction, fed.clients) / fed.clients

    @property
    def budget(self) -> float:
        """Training budget in passes over the training images (epoch equivalents)."""
        return self.steps * self.passes

    @property
    def key(self) -> str:
        return config_hash(self.resolved)


@dataclass
class Comparison:
    name: str
    description: str
    entries: list[Entry]
    sweep: dict | None
    report_dir: Path
    reference: str | None = None  # the entry the family tables compare every other against


def config_hash(resolved_yaml: str) -> str:
    return hashlib.sha256(resolved_yaml.encode()).hexdigest()[:12]


def load_comparison(
    path: str | Path, overrides: list[str], reports_root: str | Path, runs_root: str | Path
) -> Comparison:
    """Read `path`, build and check every entry (model, keys, values, federated settings).
    `overrides` are fit options (`--data.root DIR`) applied to every entry."""
    path = Path(path)
    spec = read_yaml(path)
    name = str(spec.get("name") or path.stem)
    if not NAME.match(name):
        raise UserError(f"{path}: name {name!r} must be letters, digits, '_', '-' or '.'")
    entries_spec = spec.get("entries")
    if not isinstance(entries_spec, list) or not entries_spec:
        raise UserError(f"{path}: 'entries' must be a non-empty list of {{name, label, set}}")
    shared = spec.get("shared") or {}
    if not isinstance(shared, dict):
        raise UserError(f"{path}: 'shared' must be a mapping of fit options")
    runs = Path(runs_root) / name
    expanded = [one for i, item in enumerate(entries_spec) for one in leave_one_out(path, i, item)]
    entries = [
        build_entry(path, i, item, shared, overrides, runs) for i, item in enumerate(expanded)
    ]
    for kind in ("name", "label"):  # labels key the figures' legends
        values = [getattr(e, kind) for e in entries]
        duplicate = next((v for v in values if values.count(v) > 1), None)
        if duplicate:
            raise UserError(f"{path}: entry {kind} {duplicate!r} appears twice: make it unique")
    sweep = check_sweep(path, spec.get("sweep"), entries)
    return Comparison(
        name=name,
        description=str(spec.get("description", "")),
        entries=entries,
        sweep=sweep,
        report_dir=Path(reports_root) / name,
        reference=check_reference(path, spec.get("reference"), entries),
    )


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"comparison config {path} not found: see configs/compare/")
    try:
        spec = strict_yaml(path.read_text(), str(path))
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(spec, dict):
        raise UserError(f"{path}: expected a mapping with 'entries'")
    unknown = set(spec) - TOP_KEYS
    if unknown:
        raise UserError(
            f"{path}: unknown key {sorted(unknown)[0]!r}; valid keys: {', '.join(sorted(TOP_KEYS))}"
        )
    return spec


def leave_one_out(path: Path, index: int, item: object) -> list:
    """An entry, or the two runs of a `leave_out: K` entry (module docstring)."""
    if not isinstance(item, dict) or "leave_out" not in item:
        return [item]
    site = item["leave_out"]
    name = str(item.get("name", f"entry {index + 1}"))
    if not isinstance(site, int) or isinstance(site, bool) or site < 0:
        raise UserError(f"{path}: entry {name!r}: leave_out must be a site index (0, 1, ...)")
    if not isinstance(item.get("set") or {}, dict):
        raise UserError(f"{path}: entry {name!r}: 'set' must be a mapping of fit options")
    label = str(item.get("label", name))
    base = {k: v for k, v in item.items() if k != "leave_out"}
    held = deep_merge(item.get("set") or {}, {"federated": {"hold_out": site}})
    return [
        base
        | {
            "name": f"{name}_federated",
            "label": f"{label}: federated over the rest",
            "set": deep_merge(held, {"federated": {"cross_site": True}}),
        },
        base
        | {
            "name": f"{name}_pooled",
            "label": f"{label}: centralized over the rest",
            "set": deep_merge(held, {"federated": {"pooled": True}}),
        },
    ]


def build_entry(
    path: Path, index: int, item: object, shared: dict, overrides: list[str], runs: Path
) -> Entry:
    """Merge the entry over `shared`, parse it exactly as fit will, and run fit's pre-flight
    checks; any problem is one line naming the entry."""
    if not isinstance(item, dict) or "name" not in item:
        raise UserError(f"{path}: entry {index + 1} must be a mapping with a 'name'")
    name = str(item["name"])
    where = f"{path}: entry {name!r}"
    if not NAME.match(name):
        raise UserError(f"{where}: a name must be letters, digits, '_', '-' or '.'")
    unknown = set(item) - ENTRY_KEYS
    if unknown:
        raise UserError(
            f"{where}: unknown key {sorted(unknown)[0]!r}; use name, label, family, set"
        )
    options = item.get("set") or {}
    if not isinstance(options, dict):
        raise UserError(f"{where}: 'set' must be a mapping of fit options")
    merged = deep_merge(shared, options)
    merged["experiment"] = name
    run_dir = runs / name
    argv = ["--config", yaml.safe_dump(merged, sort_keys=False), *overrides]
    argv += ["--run_dir", str(run_dir)]
    try:
        cfg, resolved, _ = parse_fit_config(argv)
        parameters = preflight(cfg)["parameters"]
    except UserError as err:
        raise UserError(f"{where}: {err}") from None
    family = item.get("family") or ""
    if not isinstance(family, str):
        raise UserError(f"{where}: 'family' must be a string, e.g. family: activation")
    label = str(item.get("label", name))
    return Entry(name, label, cfg, resolved, argv, run_dir, parameters, family)


def deep_merge(base: dict, update: dict) -> dict:
    """`update` over `base`, recursively for nested mappings; neither is modified."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def check_reference(path: Path, reference: object, entries: list[Entry]) -> str | None:
    """The entry every other is compared against: as given, else the first entry when the
    report groups entries by family (it then needs one), else none."""
    names = [e.name for e in entries]
    if reference is None:
        return names[0] if any(e.family for e in entries) else None
    if str(reference) not in names:
        raise UserError(
            f"{path}: reference {reference!r} is not an entry; entries: {', '.join(names)}"
        )
    return str(reference)


def check_sweep(path: Path, sweep: object, entries: list[Entry]) -> dict | None:
    """The optional line plot of a metric against one option (Table 2: against batch size)."""
    if sweep is None:
        return None
    if not isinstance(sweep, dict) or not {"x", "line"} <= set(sweep) or set(sweep) - SWEEP_KEYS:
        raise UserError(
            f"{path}: 'sweep' must be a mapping with x and line (and optional file, metric), "
            "e.g. {x: data.batch_size, line: model.norm}"
        )
    if sweep.get("metric", "accuracy") not in SCALARS:
        raise UserError(
            f"{path}: sweep metric {sweep['metric']!r}: use one of {', '.join(SCALARS)}"
        )
    for key in (sweep["x"], sweep["line"]):
        try:
            option(entries[0].cfg, str(key))
        except (AttributeError, KeyError, TypeError):
            raise UserError(f"{path}: sweep option {key!r} is not a fit option") from None
    return {"file": "sweep.png", "metric": "accuracy", **sweep}


def option(cfg: Namespace, dotted: str):
    """The value of a dotted fit option (`data.batch_size`) in an instantiated config."""
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part) if not isinstance(value, dict) else value[part]
    return value
