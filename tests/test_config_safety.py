"""A config names no class and gives no key twice: refused in one line naming the file and the
key, before jsonargparse parses it (its parse imports whatever a class_path names) and before
any run directory exists."""

from __future__ import annotations

import sys

import pytest

from pneumonia import fit
from pneumonia.run.config import class_valued_trainer_keys, parse_fit_config

# On old code the parse that follows a missed refusal must not train: this fails preflight.
NO_TRAINING = ["--trainer.max_epochs", "0"]


@pytest.fixture
def planted(tmp_path, monkeypatch):
    """A folder holding `planted.py`, which leaves a marker file when imported, as the working
    directory and on the import path (as under `python -m`); returns (folder, marker)."""
    marker = tmp_path / "PLANTED-RAN"
    (tmp_path / "planted.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nclass Anything:\n    pass\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path, marker
    sys.modules.pop("planted", None)  # an import would hide the next test's


def refusal(argv: list[str], capsys) -> str:
    """The one line a refused command prints (exit 2)."""
    with pytest.raises(SystemExit) as stopped:
        fit.main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


CLASS = "planted.Anything"
FILES = {  # config files naming the planted module
    "profiler.yaml": f"trainer:\n  profiler:\n    class_path: {CLASS}\n",
    "plugins.yaml": f"trainer:\n  plugins:\n  - class_path: {CLASS}\n    init_args: {{}}\n",
    "strategy.yaml": f"trainer:\n  strategy: {CLASS}\n",
    "group.yaml": f"data:\n  class_path: {CLASS}\n",
    "nested.yaml": "config: profiler.yaml\n",
    "append.yaml": f"trainer:\n  plugins+: {CLASS}\n",  # jsonargparse's list append
}
CASES = [  # (argv, what the line names)
    (["--config", "profiler.yaml"], "profiler.yaml: trainer.profiler names a class"),
    (["--config=profiler.yaml"], "profiler.yaml: trainer.profiler names a class"),
    (["--config", "plugins.yaml"], "plugins.yaml: trainer.plugins names a class"),
    (["--config", "strategy.yaml"], "strategy.yaml: trainer.strategy names a class"),
    (["--config", "group.yaml"], "group.yaml: data.class_path names a class"),
    (["--config", "nested.yaml"], "nested.yaml: config profiler.yaml names another config"),
    (["--config", f"trainer: {{profiler: {{class_path: {CLASS}}}}}"],
     "the --config text: trainer.profiler names a class"),
    (["--trainer.profiler", CLASS], "--trainer.profiler names a class (planted.Anything)"),
    (["--trainer.profiler.class_path", CLASS], "--trainer.profiler names a class"),
    (["--trainer.profiler.help", CLASS], "--trainer.profiler names a class"),
    (["--trainer", f"{{profiler: {CLASS}}}"], "--trainer.profiler names a class"),
    (["--trainer.accelerator", f"{{class_path: {CLASS}}}"], "--trainer.accelerator names a"),
    (["--config", "append.yaml"], "append.yaml: trainer.plugins names a class"),
    (["--trainer.plugins+", CLASS], "--trainer.plugins names a class"),
    ([f"--trainer.plugins+={CLASS}"], "--trainer.plugins names a class"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "named"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_a_class_named_anywhere_is_refused_before_anything_is_imported(
    argv, named, planted, capsys
):
    folder, marker = planted
    for name, text in FILES.items():
        (folder / name).write_text(text)
    line = refusal([*argv, *NO_TRAINING, "--runs_root", str(folder / "runs")], capsys)
    assert not marker.exists() and "planted" not in sys.modules
    assert line.startswith("error: ") and named in line, line
    assert "drop " in line or "its own --config" in line
    assert not (folder / "runs").exists()


def resolved_config(replace: str, by: str) -> str:
    """config.yaml as a run writes it (every key), with one line edited."""
    text = parse_fit_config([])[1]
    assert replace in text
    return text.replace(replace, by, 1)


def test_a_run_config_naming_a_class_is_refused_on_resume_without_importing_it(planted, capsys):
    run_dir, marker = planted
    edited = resolved_config("  profiler: null\n", f"  profiler:\n    class_path: {CLASS}\n")
    (run_dir / "config.yaml").write_text(edited)
    line = refusal(["--resume", str(run_dir)], capsys)
    assert not marker.exists() and "planted" not in sys.modules
    assert line == (
        f"error: {run_dir / 'config.yaml'}: trainer.profiler names a class (planted.Anything), "
        "which a config never imports: drop trainer.profiler, or give one of Lightning's "
        "names (e.g. simple)"
    )


def test_lightning_s_own_names_still_parse():
    assert class_valued_trainer_keys() == {
        "trainer.accelerator",
        "trainer.strategy",
        "trainer.profiler",
        "trainer.plugins",
    }
    argv = ["--trainer.accelerator", "cpu", "--trainer.strategy", "auto"]
    cfg = parse_fit_config([*argv, "--trainer.profiler", "simple"])[0]
    assert (cfg.trainer.accelerator, cfg.trainer.profiler) == ("cpu", "simple")
    assert parse_fit_config(["--config", "trainer: {plugins: null, profiler: null}"])[0]


DUPLICATES = [  # (config text, the line's end)
    ("seed: 1\nseed: 2\n", "seed is given twice (lines 1 and 2): keep one"),
    ("data:\n  batch_size: 4\n  image_size: 32\n  batch_size: 8\n",
     "data.batch_size is given twice (lines 2 and 4): keep one"),
    ("data:\n  augment:\n    enabled: true\n    hflip: true\n    enabled: false\n",
     "data.augment.enabled is given twice (lines 3 and 5): keep one"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), DUPLICATES)
def test_a_key_given_twice_in_a_config_file_is_one_line_naming_file_key_and_lines(
    text, expected, tmp_path, capsys
):
    config = tmp_path / "twice.yaml"
    config.write_text(text)
    argv = ["--config", str(config), *NO_TRAINING, "--runs_root", str(tmp_path / "runs")]
    assert refusal(argv, capsys) == f"error: {config}: {expected}"
    assert refusal(["--config", text, *NO_TRAINING], capsys) == (
        f"error: the --config text: {expected}"
    )
    assert not (tmp_path / "runs").exists()


def test_a_key_given_twice_on_the_command_line_or_in_a_run_config(tmp_path, capsys):
    line = refusal(["--data", "{batch_size: 4, batch_size: 8}", *NO_TRAINING], capsys)
    assert line == "error: --data: batch_size is given twice (both on line 1): keep one"
    edited = resolved_config("seed: 0\n", "seed: 0\nseed: 5\n")
    config = tmp_path / "config.yaml"
    config.write_text(edited.replace("  max_epochs: 8\n", "  max_epochs: 0\n"))
    line = refusal(["--resume", str(tmp_path)], capsys)
    assert line.startswith(f"error: {config}: seed is given twice (lines ")


def laughs() -> str:
    """Each line ten aliases of the one before: a million values from 400 bytes (eight lines
    would be a hundred million, walked by every reader of the tree)."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 6)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (laughs(), "holds more than 100,000 values, its YAML aliases written out: a config is "
         "a few hundred keys"),
        ("seed: " + "[" * 3000 + "]" * 3000 + "\n",
         "nests values too deeply to read: a config is a few levels deep"),
    ],
    ids=["aliases", "nesting"],
)  # fmt: skip
def test_a_config_too_big_to_walk_is_refused_before_any_walk(text, expected, tmp_path, capsys):
    config = tmp_path / "hostile.yaml"
    config.write_text(text)
    line = refusal(["--config", str(config), *NO_TRAINING], capsys)
    assert line == f"error: {config} {expected}"
