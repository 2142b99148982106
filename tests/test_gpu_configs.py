"""The GPU configs, trained one step each on the CPU: every `configs/*.yaml` but the `*_cpu`
ones, `default.yaml` and `flower_demo.yaml`, and every `configs/compare/*.yaml` but the `*_cpu`
ones (found by globbing: a new GPU config is covered as it lands).

Only what a CPU cannot run in seconds is overridden; every other key of the file trains as
written, and `config.yaml` of each run is checked to hold it so:

- `trainer.accelerator cpu`: the files leave it to Lightning (CUDA on a GPU machine); pinned so
  the test trains the same way on any machine.
- `trainer.precision 32-true`: on CUDA the files train in bf16-mixed (16-mixed without bf16),
  which a CPU does not run as such; bf16-mixed on the CPU is checked once, for one config.
- `data.image_size 32` and `model.width 16` (the ResNet family; other models keep their
  width, at 32 px or, for AlexNet, 64, the least it takes): 224 px full-width networks.
- `data.root null` and `data.synthetic.n_patients 40`: the embedded synthetic images, a few
  patients (a plan may name the real folder).
- `federated.rounds 1`, `federated.local_epochs 1`, `trainer.max_epochs 1` and
  `trainer.limit_train_batches 1`: one round or epoch of one step.

A comparison plan's entries are all parsed and pre-flighted, each with the same overrides;
those that train are the first of each model and strategy, and any entry that sets an option
to a word (a norm, a partition) no entry trained before it had, or to a number where those had
none (so every word the plan varies trains once): every entry trained would take minutes.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
import yaml

from pneumonia import train
from pneumonia.compare.__main__ import only_entries
from pneumonia.compare.plan import Entry, deep_merge, leave_one_out, load_comparison, read_yaml
from pneumonia.compare.runner import run_comparison
from pneumonia.core.errors import UserError
from pneumonia.models.factory import MODELS, ModelConfig, create_model
from pneumonia.run.rundir import CONFIG, SUMMARY
from pneumonia.training.module import ClassifierModule

CONFIGS = Path(__file__).parents[1] / "configs"
NOT_GPU = {"default.yaml", "flower_demo.yaml"}  # sized for 2 CPU cores
TINY = {
    "trainer.accelerator": "cpu",
    "trainer.precision": "32-true",
    "data.root": None,
    "data.synthetic.n_patients": 40,
    "federated.rounds": 1,
    "federated.local_epochs": 1,
    "trainer.max_epochs": 1,
    "trainer.limit_train_batches": 1,
}
# What makes an entry a different model or strategy.
KIND = ("model.name", "model.norm", "federated.enabled", "federated.strategy")


def gpu_configs() -> list[Path]:
    return sorted(
        p for p in CONFIGS.glob("*.yaml") if "_cpu" not in p.stem and p.name not in NOT_GPU
    )


def gpu_plans() -> list[Path]:
    return sorted(p for p in (CONFIGS / "compare").glob("*.yaml") if "_cpu" not in p.stem)


def leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    """A nested mapping as dotted keys to values."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out |= leaves(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def nested(dotted: dict[str, object]) -> dict:
    """Dotted keys to values as a nested mapping (a plan entry's `set`)."""
    tree: dict = {}
    for key, value in dotted.items():
        *groups, last = key.split(".")
        node = tree
        for group in groups:
            node = node.setdefault(group, {})
        node[last] = value
    return tree


def sized(written: dict) -> dict[str, object]:
    """The size overrides for the model that `written` (a config's mapping) names: 32 px and
    width 16 for the ResNet family, the least size the model takes (32 or 64 px) for others."""
    name = written.get("model", {}).get("name", ModelConfig.name)
    if name in MODELS.names(takes_width=True):
        return {"data.image_size": 32, "model.width": 16}
    return {"data.image_size": least_size(name)}


@functools.cache
def least_size(name: str) -> int:
    """32 px, or 64 for a model whose pooling takes no less (AlexNet); checked on the meta
    device, without computing anything."""
    try:
        with torch.device("meta"):
            create_model(ModelConfig(name=name), image_size=32)
    except UserError:
        return 64
    return 32


def argv(overrides: dict[str, object]) -> list[str]:
    """`--key value` options, values written as `pneumonia.train` writes them."""
    return [
        a
        for k, v in overrides.items()
        for a in (f"--{k}", v if isinstance(v, str) else json.dumps(v))
    ]


def assert_trained_as_written(run_dir: Path, written: dict, overridden: set[str]) -> None:
    """The run's config.yaml holds every key of `written` but the overridden ones, and the
    run trained one round or epoch on the synthetic images."""
    resolved = leaves(yaml.safe_load((run_dir / CONFIG).read_text()))
    kept = {k: v for k, v in leaves(written).items() if k not in overridden}
    assert {k: resolved.get(k, "<missing>") for k in kept} == kept
    summary = yaml.safe_load((run_dir / SUMMARY).read_text())  # JSON is YAML
    assert summary["synthetic"] is True
    if resolved["federated.enabled"]:
        assert summary["federated"]["rounds"] == 1
    else:
        assert summary["epochs"] == 1
    assert summary["val"]["n"] > 0 and 0.0 <= summary["val"]["accuracy"] <= 1.0


def test_the_gpu_configs_are_found():
    assert gpu_configs() and gpu_plans()


@pytest.mark.parametrize("config", gpu_configs(), ids=lambda p: p.name)
def test_a_gpu_config_trains_a_step_on_cpu(config, tmp_path):
    written = yaml.safe_load(config.read_text())
    overrides = TINY | sized(written)
    train(config, overrides, run_dir=tmp_path / "run")
    assert_trained_as_written(tmp_path / "run", written, set(overrides))


def representatives(entries: list[Entry]) -> list[str]:
    """The entries to train (module docstring): the first of each KIND, and any that sets an
    option the entries vary to a word (a norm, a partition, null) or to a number where none
    picked before it had one."""
    configs = {e.name: leaves(yaml.safe_load(e.resolved)) for e in entries}
    keys = set().union(*configs.values()) - {"experiment", "run_dir"}
    varying = {k for k in keys if len({repr(c.get(k)) for c in configs.values()}) > 1}
    seen: set[tuple[str, str]] = set()
    picked = []
    for name, config in configs.items():
        values = {(k, value_class(config.get(k, "<unset>"))) for k in varying}
        values.add(("kind", repr([config.get(k) for k in KIND])))
        if values - seen:
            picked.append(name)
            seen |= values
    return picked


def value_class(value: object) -> str:
    """A word as itself; any number as one class: a batch size or a coefficient takes the
    same code path at 4 as at 32."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return "a number" if number else repr(value)


@pytest.mark.parametrize("plan", gpu_plans(), ids=lambda p: p.name)
def test_a_gpu_plan_trains_a_step_of_each_kind_of_entry_on_cpu(plan, tmp_path):
    spec = read_yaml(plan)
    shared = spec.get("shared") or {}
    items = [one for i, item in enumerate(spec["entries"]) for one in leave_one_out(plan, i, item)]
    written = {item["name"]: deep_merge(shared, item.get("set") or {}) for item in items}
    # Each entry's size for its model goes into its `set`; the rest, as the command's
    # `--key value` options, into every entry alike.
    spec["entries"] = [
        item | {"set": deep_merge(item.get("set") or {}, nested(sized(written[item["name"]])))}
        for item in items
    ]
    tiny = tmp_path / plan.name
    tiny.write_text(yaml.safe_dump(spec, sort_keys=False))
    # Every entry is built and pre-flighted here, as fit would (model, keys, values).
    comparison = load_comparison(tiny, argv(TINY), tmp_path / "reports", tmp_path / "runs")
    assert [e.name for e in comparison.entries] == list(written)
    trained = representatives(comparison.entries)
    run_comparison(only_entries(comparison, ",".join(trained)))
    for entry in comparison.entries:
        overridden = set(TINY) | set(sized(written[entry.name])) | {"experiment"}
        assert_trained_as_written(entry.run_dir, written[entry.name], overridden)


def test_bf16_mixed_trains_a_step_on_cpu(tmp_path, monkeypatch):
    """What the configs train in on a GPU, once: autocast to bfloat16 in every training step.
    Emulated where the CPU has no native bf16 (the fallback to 32-true would skip the path)."""
    monkeypatch.setattr("pneumonia.run.config.native_cpu_bf16", lambda: True)
    autocast: list[torch.dtype | None] = []
    forward = ClassifierModule.forward

    def recording(self, images):
        if self.training:
            on = torch.is_autocast_enabled("cpu")
            autocast.append(torch.get_autocast_dtype("cpu") if on else None)
        return forward(self, images)

    monkeypatch.setattr(ClassifierModule, "forward", recording)
    config = CONFIGS / "fl_se_resnet_gn.yaml"  # the paper's model, federated
    written = yaml.safe_load(config.read_text())
    overrides = TINY | sized(written) | {"trainer.precision": "bf16-mixed"}
    summary = train(config, overrides, run_dir=tmp_path / "run")
    assert autocast and set(autocast) == {torch.bfloat16}
    assert torch.isfinite(torch.tensor(summary["val"]["loss"]))
    assert_trained_as_written(tmp_path / "run", written, set(overrides))
