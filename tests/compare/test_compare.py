"""`python -m pneumonia.compare` end to end on tiny synthetic comparisons."""

import csv
import json
import math
import os
import re
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from pneumonia.compare import plots, runner
from pneumonia.compare.__main__ import main
from pneumonia.compare.plan import deep_merge, load_comparison
from pneumonia.compare.report import (
    SHORT,
    SPLITS,
    curve,
    diverged,
    family_sections,
    markdown_table,
    privacy_columns,
    results_markdown,
    selection,
    slug,
    split_columns,
    write_report,
)
from pneumonia.core.errors import UserError
from pneumonia.metrics.classification import SCALARS
from pneumonia.models.factory import ModelConfig, count_parameters, create_model
from pneumonia.run.rundir import locked

ROOT = Path(__file__).parents[2]
NOTEBOOK = ROOT / "notebooks" / "compare.ipynb"
CONFIGS = ROOT / "configs" / "compare"
TINY = {
    "name": "tiny",
    "description": "Two tiny entries on synthetic images.",
    "shared": {
        "seed": 0,
        "figures_every": 0,  # TensorBoard figures: each reported model's only
        "data": {"image_size": 32, "batch_size": 16, "synthetic": {"n_patients": 40}},
        "model": {"name": "resnet18", "width": 16},
        "trainer": {
            "max_epochs": 2,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "log_every_n_steps": 1,
        },
        "federated": {"clients": 2, "rounds": 2, "local_epochs": 1},
    },
    "entries": [
        {"name": "central_bn", "label": "ResNet-18-BN", "set": {"model": {"norm": "bn"}}},
        {
            "name": "fl_gn",
            "label": "FL ResNet-18-GN",
            "set": {"model": {"norm": "gn"}, "federated": {"enabled": True}},
        },
    ],
    "sweep": {"x": "data.batch_size", "line": "model.norm", "file": "batch_size.png"},
}
COLUMNS = [
    "entry", "label", "training", "model", "norm", "batch_size", "budget_passes",
    *(f"val_{k}" for k in SCALARS), "parameters", "wall_time_s", "data_left_site", "config_hash",
    "selected_by",
    *(f"{s}_{k}{end}" for s in SPLITS for k in SCALARS for end in ("", "_low", "_high")),
]  # fmt: skip
END = ("_low", "", "_high")
ENTRIES = [e["name"] for e in TINY["entries"]]
FILES = ["results.csv", "results.md", "curves_accuracy.png", "curves_loss.png", "roc.png"]


def write_config(folder: Path, spec: dict) -> Path:
    path = folder / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def compare(folder: Path, config: Path, *extra: str):
    roots = ["--reports_root", str(folder / "reports"), "--runs_root", str(folder / "runs")]
    return main(["--config", str(config), *roots, *extra])


def read_rows_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_rows(report: Path) -> list[dict]:
    return read_rows_csv(report / "results.csv")


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare")
    config = write_config(folder, TINY)
    return folder, config, Path(compare(folder, config))


def test_report_holds_every_file_with_one_row_per_entry(tiny_report):
    _, _, report = tiny_report
    per_entry = [
        f"{kind}_{e}.png" for kind in ("confusion", "reliability", "cases") for e in ENTRIES
    ]
    for name in [*FILES, *per_entry, "batch_size.png"]:
        assert (report / name).stat().st_size > 1000 or name.endswith((".csv", ".md")), name
    rows = read_rows(report)
    assert [r["entry"] for r in rows] == ["central_bn", "fl_gn"]
    assert set(COLUMNS) <= set(rows[0])
    assert [r["training"] for r in rows] == ["centralized", "federated"]
    assert [r["data_left_site"] for r in rows] == ["yes", "no"]
    # synthetic data has no test split
    assert rows[0]["test_accuracy"] == rows[0]["test_accuracy_low"] == ""
    markdown = (report / "results.md").read_text()
    assert "| ResNet-18-BN | centralized | yes |" in markdown
    assert "| FL ResNet-18-GN | federated | no |" in markdown
    assert "## Validation split (clean)" in markdown and "## Shift validation" in markdown
    assert "## Test split" not in markdown
    assert "95% bootstrap intervals resampled by patient" in markdown
    assert "overstates accuracy on new patients" in markdown


def test_metrics_carry_their_bootstrap_intervals(tiny_report):
    """results.csv holds each metric's 95% interval by patient around it, results.md shows
    it as `value (low-high)`, and the selection rule comes from summary.json."""
    _, _, report = tiny_report
    rows = read_rows(report)
    for row in rows:
        summary = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
        assert row["selected_by"] == summary["selected_by"] != ""
        for split in ("val", "val_shift"):
            for key in ("accuracy", "auroc", "ece"):
                low, value, high = (float(row[f"{split}_{key}{end}"]) for end in END)
                assert [low, high] == summary[split]["ci95"][key]
                # Not ECE: its bootstrap is biased upwards, the value may fall under `low`.
                if key != "ece":
                    assert low <= value + 1e-4 and value <= high + 1e-4, (split, key)
    markdown = (report / "results.md").read_text()
    accuracy = rows[0]["val_accuracy"], rows[0]["val_accuracy_low"], rows[0]["val_accuracy_high"]
    value, low, high = (float(v) for v in accuracy)
    assert f"| {value:.3f} ({low:.3f}-{high:.3f}) |" in markdown
    assert re.search(r"\| \d\.\d{3} \(\d\.\d{3}-\d\.\d{3}\) \|", markdown.split("## Shift")[1])
    assert "| ECE |" in markdown
    # A centralized entry picks an epoch, a federated one a round: the rules differ.
    assert "The rule that chose each entry's model is in results.csv" in markdown


def test_one_selection_rule_is_named_in_the_report():
    rule = "the epoch whose weights had the best val/loss"
    same = selection([{"selected_by": rule}, {"selected_by": rule}])
    assert same == f"Each entry's reported model is {rule}"
    assert "results.csv" in selection([{"selected_by": rule}, {"selected_by": ""}])


def test_rows_are_the_entries_own_summaries(tiny_report):
    folder, _, report = tiny_report
    for row in read_rows(report):
        summary = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
        for key in SCALARS:
            assert float(row[f"val_{key}"]) == pytest.approx(summary["val"][key], abs=1e-4)
        assert float(row["wall_time_s"]) == summary["wall_time_s"]
        norm = row["norm"]
        expected = count_parameters(create_model(ModelConfig(name="resnet18", norm=norm, width=16)))
        assert int(row["parameters"]) == expected
        assert Path(row["run_dir"]) == folder / "runs" / "tiny" / row["entry"]
        # The entry's run directory is a complete fit run, predictions included.
        predictions = (Path(row["run_dir"]) / "predictions.csv").read_text().splitlines()
        assert predictions[0] == "split,image,patient,positive,probability"
        val_rows = [line for line in predictions if line.startswith("val,")]
        assert len(val_rows) == summary["val"]["n"]


def test_each_entry_trained_with_its_own_options(tiny_report):
    folder, _, _ = tiny_report
    runs = folder / "runs" / "tiny"
    central = yaml.safe_load((runs / "central_bn" / "config.yaml").read_text())
    federated = yaml.safe_load((runs / "fl_gn" / "config.yaml").read_text())
    assert (central["model"]["norm"], central["federated"]["enabled"]) == ("bn", False)
    assert (federated["model"]["norm"], federated["federated"]["enabled"]) == ("gn", True)
    assert central["data"]["image_size"] == federated["data"]["image_size"] == 32
    assert (runs / "fl_gn" / "rounds.csv").is_file()
    assert (runs / "central_bn" / "metrics.csv").is_file()


def test_curves_share_one_axis_of_passes(tiny_report, tmp_path):
    folder, config, _ = tiny_report
    entries = load_comparison(config, [], tmp_path, folder / "runs").entries
    assert [e.budget for e in entries] == [2.0, 2.0]
    central, federated = (curve(e) for e in entries)
    assert [x for x, _ in central["val_accuracy"]] == [1, 2]
    assert [x for x, _ in central["train_loss"]] == [1, 2]
    assert [x for x, _ in federated["val_accuracy"]] == [1.0, 2.0]
    rounds = read_rows_csv(folder / "runs" / "tiny" / "fl_gn" / "rounds.csv")
    assert [v for _, v in federated["val_loss"]] == [float(r["val_loss"]) for r in rounds]


def test_centralized_val_loss_is_the_plain_cross_entropy(tiny_report):
    """metrics.csv's val/loss at the best epoch equals the unweighted cross-entropy the
    summary (and every federated round) reports, though training used class weights."""
    folder, _, _ = tiny_report
    run = folder / "runs" / "tiny" / "central_bn"
    summary = json.loads((run / "summary.json").read_text())
    rows = read_rows_csv(run / "metrics.csv")
    best = [r for r in rows if r.get("val/loss") and int(r["epoch"]) == summary["best_epoch"]]
    assert float(best[0]["val/loss"]) == pytest.approx(summary["val"]["loss"], abs=1e-4)


def test_a_second_run_skips_finished_entries(tiny_report, capsys):
    folder, config, report = tiny_report
    summaries = sorted((folder / "runs" / "tiny").glob("*/summary.json"))
    before = [p.stat().st_mtime_ns for p in summaries]
    (report / "roc.png").unlink()
    compare(folder, config)
    assert "2 already finished with the same config, 0 to train" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in summaries] == before
    assert (report / "roc.png").is_file()  # the report is drawn again


def test_a_changed_entry_trains_again_and_keeps_the_old_run(tmp_path, capsys):
    spec = deep_merge(TINY, {"name": "changed", "shared": {"trainer": {"max_epochs": 1}}})
    spec["entries"] = [spec["entries"][0]]
    config = write_config(tmp_path, spec)
    compare(tmp_path, config)
    spec["entries"][0]["set"]["optim"] = {"lr": 0.01}
    write_config(tmp_path, spec)
    compare(tmp_path, config)
    out = capsys.readouterr().out
    assert "0 already finished with the same config, 1 to train" in out
    kept = list((tmp_path / "runs" / "changed").glob("central_bn.replaced-*"))
    assert len(kept) == 1 and (kept[0] / "summary.json").is_file()
    config_now = yaml.safe_load((tmp_path / "runs/changed/central_bn/config.yaml").read_text())
    assert config_now["optim"]["lr"] == 0.01


def test_an_interrupted_comparison_continues_where_it_stopped(tiny_report, tmp_path, capsys):
    """Killed after round 1 of the second entry: a re-run skips the first, resumes the second
    and ends with the uninterrupted comparison's figures."""
    _, _, reference = tiny_report
    config = write_config(tmp_path, TINY)
    original = runner.ComparisonProgress.__call__

    def killed_in_round_1_of_entry_2(self, done, total):
        original(self, done, total)
        if self.entry.name == "fl_gn" and done == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler or `kill` sends

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner.ComparisonProgress, "__call__", killed_in_round_1_of_entry_2)
        with pytest.raises(SystemExit) as stopped:
            compare(tmp_path, config)
    assert stopped.value.code == 143
    err = capsys.readouterr().err.strip()
    assert err.startswith("interrupted by SIGTERM: entry 'fl_gn': round 1 is saved in ")
    assert err.endswith("run the same command again to continue from there")
    assert not (tmp_path / "reports" / "tiny" / "results.csv").exists()
    compare(tmp_path, config)
    out = capsys.readouterr().out
    assert "1 already finished with the same config, 1 to train" in out
    assert "resuming" in out
    resumed, uninterrupted = read_rows(tmp_path / "reports" / "tiny"), read_rows(reference)
    for a, b in zip(resumed, uninterrupted, strict=True):
        assert [a[f"val_{k}"] for k in SCALARS] == [b[f"val_{k}"] for k in SCALARS]


def test_force_trains_every_entry_again(tmp_path, capsys):
    spec = deep_merge(TINY, {"name": "forced", "shared": {"trainer": {"max_epochs": 1}}})
    spec["entries"] = [spec["entries"][0]]
    config = write_config(tmp_path, spec)
    compare(tmp_path, config)
    summary = tmp_path / "runs" / "forced" / "central_bn" / "summary.json"
    first = json.loads(summary.read_text())
    compare(tmp_path, config, "--force")
    assert "0 already finished with the same config, 1 to train" in capsys.readouterr().out
    again = json.loads(summary.read_text())
    assert again["val"] == first["val"]  # same seed, same figures
    assert not list(summary.parent.parent.glob("*.replaced-*"))


def broken(entry_set: dict, name: str = "second") -> dict:
    spec = deep_merge(TINY, {})
    spec["entries"] = [spec["entries"][0], {"name": name, "set": entry_set}]
    return spec


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (broken({"model": {"name": "resnet99"}}), "entry 'second': unknown model.name 'resnet99'"),
        (broken({"optim": {"lrr": 0.1}}), "entry 'second': Group 'optim' does not accept"),
        (broken({"data": {"batch_size": "many"}}), "entry 'second':"),
        (broken({"federated": {"enabled": True, "fraction": 0}}), "entry 'second':"),
        (broken({"model": {"norm": "gn", "gn_groups": 5}}), "entry 'second': model.gn_groups"),
        (broken({}, name="central_bn"), "entry name 'central_bn' appears twice"),
        (
            {
                **TINY,
                "entries": [TINY["entries"][0], {**TINY["entries"][1], "label": "ResNet-18-BN"}],
            },
            "entry label 'ResNet-18-BN' appears twice",
        ),
        (
            {**TINY, "sweep": {"x": "data.batch_size", "line": "model.norm", "metric": "acc"}},
            "sweep metric 'acc'",
        ),
        (broken({}, name="a b"), "entry 'a b': a name must be"),
        ({**TINY, "entries": []}, "'entries' must be a non-empty list"),
        ({**TINY, "colour": "red"}, "unknown key 'colour'"),
        ({**TINY, "sweep": {"x": "data.size", "line": "model.norm"}}, "sweep option 'data.size'"),
        (
            {**TINY, "reference": "nobody"},
            "tiny.yaml: reference 'nobody' is not an entry; entries: central_bn, fl_gn",
        ),
        (
            {**TINY, "entries": [TINY["entries"][0], {**TINY["entries"][1], "family": [1]}]},
            "tiny.yaml: entry 'fl_gn': 'family' must be a string",
        ),
    ],
)
def test_a_broken_entry_fails_before_any_training(tmp_path, capsys, spec, message):
    config = write_config(tmp_path, spec)
    with pytest.raises(SystemExit) as exit_info:
        compare(tmp_path, config)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert message in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "reports").exists()


def test_missing_config_and_report_only_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit):
        compare(tmp_path, tmp_path / "nowhere.yaml")
    assert "comparison config" in capsys.readouterr().err
    config = write_config(tmp_path, TINY)
    with pytest.raises(SystemExit):
        compare(tmp_path, config, "--report_only")
    assert "entries not trained yet under this config: central_bn, fl_gn" in capsys.readouterr().err


def test_deep_merge_keeps_shared_keys_and_copies():
    shared = {"data": {"image_size": 64, "augment": {"enabled": True}}, "seed": 0}
    merged = deep_merge(shared, {"data": {"augment": {"enabled": False}}, "seed": 3})
    assert merged == {"data": {"image_size": 64, "augment": {"enabled": False}}, "seed": 3}
    assert shared["data"]["augment"]["enabled"] is True


def test_progress_estimates_the_time_left(tmp_path, monkeypatch, capsys):
    config = write_config(tmp_path, TINY)
    comparison = load_comparison(config, [], tmp_path, tmp_path)
    clock = iter([100.0, 100.0, 160.0, 160.0])
    monkeypatch.setattr(runner.time, "time", lambda: next(clock))
    progress = runner.ComparisonProgress(comparison, comparison.entries)  # 4 passes to train
    progress.start(comparison.entries[0])
    progress(1, 2)  # 1 pass in 60 s: 3 passes left, about 3 minutes
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "[tiny 1/2 central_bn | 1m00s elapsed, about 3m00s left]: epoch 1/2"


def test_the_notebook_executes_on_a_report(tiny_report, monkeypatch):
    import nbclient
    import nbformat

    _, _, report = tiny_report
    monkeypatch.setenv("PNEUMONIA_REPORT", str(report))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=120, resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()  # the kernel inherits PNEUMONIA_REPORT
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert str(report) in text and "2 entries; highest validation AUROC" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 5  # two curves, the ROC, two confusion matrices


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_comparisons_load_with_one_budget(path, tmp_path, monkeypatch):
    """Every shipped comparison parses and passes fit's pre-flight checks, and its entries
    share one budget (passes over the training images), image size and seed. A comparison
    that transfers from a run of ours finds that run's checkpoint where its config says."""
    source = re.search(r"pretrained: (runs/\S+\.ckpt)", path.read_text())
    if source:
        monkeypatch.chdir(tmp_path)
        write_three_class_source(tmp_path / source.group(1))
    comparison = load_comparison(path, [], tmp_path, tmp_path)
    entries = comparison.entries
    assert comparison.name == path.stem and len(entries) >= 2
    if path.stem == "privacy_cpu":  # each model at its own recipe: the same budget per model
        by_model = {(e.cfg.model.name, e.cfg.data.batch_size): e.budget for e in entries}
        assert all(e.budget == by_model[(e.cfg.model.name, e.cfg.data.batch_size)] for e in entries)
    else:
        assert len({e.budget for e in entries}) == 1
    assert len({(e.cfg.data.image_size, e.cfg.seed, e.cfg.data.val_fraction) for e in entries}) == 1
    if path.stem.startswith("paper_table3"):
        models = [(e.cfg.model.name, e.federated) for e in entries]
        assert ("se_resnet18", True) in models and ("alexnet", False) in models
    if path.stem.startswith("paper_table2"):
        assert comparison.sweep["file"] == "batch_size.png"
        assert sorted({e.cfg.data.batch_size for e in entries}) == [4, 8, 16, 32]


def write_three_class_source(path: Path) -> None:
    """An untrained three-class SE-ResNet-18-GN checkpoint: what a transfer comparison loads."""
    from dataclasses import asdict

    from pneumonia.data.imageset import THREE_CLASSES
    from pneumonia.models.factory import ModelConfig
    from pneumonia.training.checkpoint import write_checkpoint
    from pneumonia.training.recipe import Recipe, build_module

    recipe = Recipe(model=asdict(ModelConfig()), optim={}, image_size=64, classes=THREE_CLASSES)
    path.parent.mkdir(parents=True)
    write_checkpoint(path, build_module(recipe).state_dict(), recipe, round_number=1)


def private_row(label: str, epsilon, accuracy: float, **extra) -> dict:
    """A results row as entry_row writes it, for the privacy table and plot (`extra`: e.g.
    its family; without one it is a row of an old comparison's hand-built kind)."""
    row = {"label": label, "training": "federated", "data_left_site": "no"} | extra
    row |= {"epsilon": epsilon, "delta": 1e-5 if epsilon != "" else ""}
    for split in SPLITS:
        for key in SCALARS:
            value = accuracy if split != "test" else ""
            low_high = (accuracy - 0.05, accuracy + 0.05) if split != "test" else ("", "")
            row |= {f"{split}_{key}": value}
            row |= {f"{split}_{key}_low": low_high[0], f"{split}_{key}_high": low_high[1]}
    return row | {"parameters": 11_000_000, "wall_time_s": 60.0}


def test_privacy_columns_table_and_plot(tmp_path):
    assert privacy_columns({"val": {}}) == {"epsilon": "", "delta": ""}
    summary = {
        "privacy": {
            "clients": {"epsilon": 7.99, "delta": 1e-5},
            "server": {"epsilon": 12.1, "delta": 0.01},
        }
    }
    assert privacy_columns(summary) == {"epsilon": 12.1, "delta": 0.01}  # the weakest
    rows = [private_row("No DP", "", 0.9), private_row("eps 8", 7.99, 0.8)]
    table = markdown_table(rows, "val").splitlines()
    assert "| Epsilon (delta) |" in table[0]
    assert "| No DP | federated | no | no DP | 0.900 (0.850-0.950) |" in table[2]
    assert "| eps 8 | federated | no | 7.99 (1e-05) | 0.800 (0.750-0.850) |" in table[3]
    figure = plots.privacy(rows, tmp_path / "privacy.png")
    assert (tmp_path / "privacy.png").stat().st_size > 10_000
    assert legend(figure) == ["all entries", "chance"]  # rows without a family: one line
    plain = [private_row("No DP", "", 0.9)]
    assert "Epsilon" not in markdown_table(plain, "val")


def legend(figure) -> list[str]:
    return [t.get_text() for t in figure.axes[-1].get_legend().get_texts()]


def test_privacy_plot_draws_a_line_per_model(tmp_path):
    """A grid of 2 models x (epsilon 1, 8, no DP): per panel (clean, shift) one AUROC line per
    model over its private entries, its no-DP entry apart at the "no DP" tick, the models
    nudged apart, near-equal epsilons (7.95, 7.99) one tick; a diverged entry draws no point."""
    rows = []
    for family, base, eight in (("WS-GN CNN", 0.8, 7.95), ("ScatterNet + linear", 0.7, 7.99)):
        rows += [
            private_row(f"{family}, no DP", "", base + 0.1, family=family),
            private_row(f"{family}, eps 8", eight, base, family=family),
            private_row(f"{family}, eps 1", 1.0, base - 0.1, family=family),
        ]
    rows.append(private_row("ScatterNet + linear, eps 3", 3.0, 0.6, family="ScatterNet + linear")
                | {"diverged": "yes"})  # fmt: skip
    figure = plots.privacy(rows, tmp_path / "privacy.png")
    assert legend(figure) == ["WS-GN CNN", "ScatterNet + linear", "chance"]
    clean, shift = figure.axes
    assert [ax.get_title() for ax in figure.axes] == ["AUROC, clean validation",
                                                      "AUROC, shift validation"]  # fmt: skip
    for ax in (clean, shift):
        assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "3", "8", "no DP"]
        drawn = [(c.lines[0].get_xdata(), c.lines[0].get_ydata()) for c in ax.containers]
        assert len(drawn) == 4  # per model: its private line, its no-DP point
        (cnn_x, cnn_y), (cnn_plain_x, cnn_plain_y), (scat_x, scat_y), (scat_plain_x, _) = drawn
        assert list(cnn_y) == pytest.approx([0.7, 0.8]) and list(scat_y) == pytest.approx(
            [0.6, 0.7]
        )  # epsilon 1 then 8; the diverged epsilon 3 left out
        assert cnn_x[0] < 1.0 < scat_x[0] and cnn_x[1] < 7.95 < 7.99 < scat_x[1]  # nudged apart
        assert list(cnn_plain_y) == pytest.approx([0.9])
        assert cnn_plain_x[0] > 7.99 * 2 and scat_plain_x[0] > cnn_plain_x[0]


def test_family_and_reference_are_read(tmp_path):
    """An entry's family and the comparison's reference; the first entry is the reference
    by default once any entry has a family, and there is none without families."""
    assert load_comparison(write_config(tmp_path, TINY), [], tmp_path, tmp_path).reference is None
    entries = [TINY["entries"][0], {**TINY["entries"][1], "family": "lr decay"}]
    comparison = load_comparison(
        write_config(tmp_path, {**TINY, "entries": entries}), [], tmp_path, tmp_path
    )
    assert [e.family for e in comparison.entries] == ["", "lr decay"]
    assert comparison.reference == "central_bn"
    chosen = {**TINY, "entries": entries, "reference": "fl_gn"}
    assert load_comparison(write_config(tmp_path, chosen), [], tmp_path, tmp_path).reference == (
        "fl_gn"
    )


def study_row(entry: str, family: str, auroc: float, interval: list, **summary) -> dict:
    """A results row as entry_row writes it, from a hand-written summary.json: AUROC and ACC
    alike on both validation sets, log loss 0.3 (0.2-0.4) unless `summary` says otherwise."""
    values = {"auroc": auroc, "accuracy": auroc, "loss": 0.3}
    ci95 = {"auroc": interval, "accuracy": interval, "loss": [0.2, 0.4]}
    summary = {s: values | {"ci95": ci95} for s in ("val", "val_shift")} | summary
    row = {"entry": entry, "label": entry.title(), "family": family}
    row |= {"training": "centralized", "data_left_site": "yes", "epsilon": "", "delta": ""}
    row |= {"threshold": 0.5, "selected_by": "best val/loss", "best_epoch_or_round": 3}
    row |= {"diverged": "yes" if diverged(summary) else "no"}
    for split in SPLITS:
        row |= split_columns(summary.get(split), split)
    return row | {"parameters": 11_000_000, "wall_time_s": 65.0}


def study_rows() -> list[dict]:
    nan = math.nan
    return [
        study_row("base", "Reference", 0.90, [0.85, 0.95]),  # alone in its family
        study_row("up", "lr decay", 0.97, [0.92, 0.99]),  # entirely above 0.90
        study_row("near", "lr decay", 0.91, [0.86, 0.96]),  # holds 0.90
        study_row("blown", "Loss", nan, [nan, nan], diverged=True, val_shift=None),
        study_row("nan", "Loss", nan, [nan, nan], val={"loss": nan, "auroc": nan}),
        study_row("down", "Loss", 0.80, [0.75, 0.88]),  # entirely below 0.90
    ]


def test_diverged_runs_are_recognised():
    assert diverged({"diverged": True, "val": {"loss": 0.3}})
    assert diverged({"val": {"loss": math.nan}}) and diverged({"val": {"loss": None}})
    assert not diverged({"val": {"loss": 0.3}}) and not diverged({"diverged": False})


def test_family_tables_mark_intervals_that_exclude_the_reference():
    text = "\n\n".join(family_sections(study_rows(), "base"))
    assert "## Reference" not in text
    decay, loss = text.split("## lr decay\n\n")[1].split("## Loss\n\n")
    reference = "| Base (reference) | " + "0.900 (0.850-0.950) | " * 2 + "0.300 (0.200-0.400) | "
    reference += "0.900 (0.850-0.950) | " * 2 + "0.300 (0.200-0.400) | 3 | 1m05s |"
    for table in (decay, loss):
        lines = table.splitlines()
        assert lines[0].startswith("| Entry | Val AUROC | Val ACC | Val log loss | Shift AUROC |")
        assert lines[0].endswith("| Shift ACC | Shift log loss | Best epoch | Wall time |")
        assert lines[2] == reference  # first in every family
    up = "0.970 (0.920-0.990) ▲ | 0.970 (0.920-0.990) ▲ | 0.300 (0.200-0.400)"
    assert f"| Up | {up} | {up} | 3 | 1m05s |" in decay.splitlines()
    near = "| Near | 0.910 (0.860-0.960) | 0.910 (0.860-0.960) | 0.300 (0.200-0.400) |"
    assert near in decay
    down = "0.800 (0.750-0.880) ▼ | 0.800 (0.750-0.880) ▼ | 0.300 (0.200-0.400)"
    assert f"| Down | {down} | {down} | 3 | 1m05s |" in loss.splitlines()
    assert text.count("▲") == 4 + 1 and text.count("▼") == 4 + 1  # the rows and the note
    for name in ("Blown", "Nan"):
        assert f"| {name} | " + "diverged | " * 6 + "3 | 1m05s |" in loss.splitlines()
    assert "![lr decay](family_lr_decay.png)" in decay and "![Loss](family_loss.png)" in loss
    assert "not a paired test" in loss and "diverged: the entry's training loss" in loss
    assert slug("LR decay (cosine)") == "lr_decay__cosine_"


def test_family_sections_come_first_and_the_full_listing_stays():
    rows = study_rows()
    comparison = SimpleNamespace(name="study", description="One change each.", reference="base")
    markdown = results_markdown(comparison, rows)
    assert markdown.index("One change each.") < markdown.index("## lr decay")
    assert markdown.index("## Loss") < markdown.index("## Validation split (clean)")
    listing = markdown.split("## Validation split (clean)")[1]
    assert "| Blown | centralized | yes | " + "diverged | " * len(SHORT) in listing
    assert "decision threshold 0.5." in markdown
    plain = results_markdown(comparison, [{**r, "family": ""} for r in rows])
    assert "## Loss" not in plain and "▲" not in plain


def test_family_figure_draws_diverged_entries(tmp_path):
    rows = study_rows()
    plots.family([rows[0], *rows[3:]], "Loss", tmp_path / "family_loss.png")
    png = (tmp_path / "family_loss.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    only_diverged = [rows[3], rows[4]]  # not even the reference has a point
    plots.family(only_diverged, "Loss", tmp_path / "none.png")
    assert (tmp_path / "none.png").read_bytes().startswith(b"\x89PNG")


def test_a_report_with_a_diverged_entry_is_drawn(tiny_report, tmp_path):
    """The tiny runs, the federated one rewritten as diverged (NaN val loss and AUROC): the
    report lists it in every table and the family figure, and draws every other figure."""
    folder, _, _ = tiny_report
    shutil.copytree(folder / "runs" / "tiny", tmp_path / "runs" / "tiny")
    path = tmp_path / "runs" / "tiny" / "fl_gn" / "summary.json"
    summary = json.loads(path.read_text())
    summary["diverged"] = True
    summary["val"] |= {"loss": math.nan, "auroc": math.nan}
    summary["val"]["ci95"]["auroc"] = [math.nan, math.nan]
    path.write_text(json.dumps(summary))
    entries = [TINY["entries"][0], {**TINY["entries"][1], "family": "Normalisation"}]
    config = write_config(tmp_path, {**TINY, "entries": entries})
    comparison = load_comparison(config, [], tmp_path / "reports", tmp_path / "runs")
    markdown = write_report(comparison).read_text()
    report = comparison.report_dir
    assert [r["diverged"] for r in read_rows(report)] == ["no", "yes"]
    assert [r["family"] for r in read_rows(report)] == ["", "Normalisation"]
    section = markdown.split("## Normalisation")[1].split("## Validation")[0]
    assert "| ResNet-18-BN (reference) |" in section
    assert "| FL ResNet-18-GN | " + "diverged | " * 6 in section
    assert "![Normalisation](family_normalisation.png)" in section
    for name in ("family_normalisation.png", "roc.png", "curves_loss.png"):
        assert (report / name).stat().st_size > 10_000, name


def test_the_worst_subgroup_columns_and_table():
    from pneumonia.compare.report import group_columns, groups_markdown

    assert group_columns({"val": {}})["worst_group"] == ""
    worst = {"group": "person-virus", "accuracy": 0.63, "ci95": [0.55, 0.70], "n": 205}
    columns = group_columns({"worst_group": {"val": worst}})
    assert columns == {
        "worst_group": "person-virus",
        "worst_group_accuracy": 0.63,
        "worst_group_accuracy_low": 0.55,
        "worst_group_accuracy_high": 0.70,
    }
    row = {"label": "FedAvg", "val_accuracy": 0.84, "val_accuracy_low": 0.81,
           "val_accuracy_high": 0.87} | columns  # fmt: skip
    table = groups_markdown([row, {"label": "no groups", "worst_group": ""}]).splitlines()
    assert table[2] == "| FedAvg | 0.840 [0.810, 0.870] | person-virus | 0.630 [0.550, 0.700] |"
    assert len(table) == 3  # the entry without groups has no row


def test_a_comparison_config_with_a_key_given_twice_is_refused(tmp_path, capsys):
    config = write_config(tmp_path, TINY)
    config.write_text(config.read_text() + "seed: 1\nseed: 2\n")
    with pytest.raises(SystemExit) as exit_info:
        compare(tmp_path, config)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "seed is given twice" in err and len(err.splitlines()) == 1


def test_a_run_another_process_writes_is_neither_removed_nor_moved(tmp_path):
    run_dir = tmp_path / "runs" / "entry"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("seed: 0\n")
    entry = SimpleNamespace(run_dir=run_dir)
    with locked(run_dir, "wait"):  # as a fit of it would hold it
        for status in (runner.STALE, "forced"):
            with pytest.raises(UserError, match="being written by another process"):
                runner.clear_run_dir(entry, status)
    assert (run_dir / "config.yaml").read_text() == "seed: 0\n"
    runner.clear_run_dir(entry, "forced")  # once it has ended
    assert not run_dir.exists()
