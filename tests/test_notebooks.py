"""The notebooks without their input: the first run of a newcomer. Each stops at once with one
line naming the command to run first (no traceback, no cell after it run); `tests/compare`
and the fit tests run them on a report and on runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def execute(name: str, folder: Path) -> tuple[list[dict], list]:
    """Run notebooks/<name> as if it sat in folder/notebooks: (its error outputs, its code
    cells)."""
    import nbclient
    import nbformat

    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    here = folder / "notebooks"
    here.mkdir(exist_ok=True)
    client = nbclient.NotebookClient(
        notebook, timeout=60, resources={"metadata": {"path": str(here)}}
    )
    with pytest.raises(nbclient.exceptions.CellExecutionError):
        client.execute()
    code = [c for c in notebook.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    return errors, code


def one_line(errors: list[dict], code: list, stopped_at: int) -> str:
    """The one error line; no code cell after the one that stopped ran."""
    assert len(errors) == 1 and errors[0]["ename"] == "Missing"
    assert len(errors[0]["traceback"]) == 1  # the message alone, no traceback
    assert all(c.execution_count is None for c in code[stopped_at + 1 :])
    return errors[0]["traceback"][0]


def commands(line: str) -> list[str]:
    return re.findall(r"`([^`]+)`", line)


def test_compare_without_a_report_says_which_command_writes_one(tmp_path, monkeypatch):
    monkeypatch.delenv("PNEUMONIA_REPORT", raising=False)
    line = one_line(*execute("compare.ipynb", tmp_path), stopped_at=0)
    assert line.startswith("no report under ../reports yet: first run `python -m pneumonia")
    command = commands(line)[0].split()
    assert command[:4] == ["python", "-m", "pneumonia.compare", "--config"]
    assert (ROOT / command[4]).is_file()  # a comparison this checkout ships


def test_compare_on_a_folder_without_results_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PNEUMONIA_REPORT", str(tmp_path))
    line = one_line(*execute("compare.ipynb", tmp_path), stopped_at=0)
    assert line.startswith(f"PNEUMONIA_REPORT={tmp_path} holds no results.csv: name a")


def test_explore_run_without_a_run_says_which_command_makes_one(tmp_path):
    line = one_line(*execute("explore_run.ipynb", tmp_path), stopped_at=1)
    assert line.startswith("no run under ../runs yet: first run `make fit` (python -m pneumonia")
    config = re.search(r"--config (\S+):", line).group(1)
    assert (ROOT / config).is_file()


def test_explore_run_on_an_unfinished_run_says_how_to_continue_it(tmp_path):
    run_dir = tmp_path / "runs" / "default" / "version_0"
    run_dir.mkdir(parents=True)
    line = one_line(*execute("explore_run.ipynb", tmp_path), stopped_at=1)
    assert commands(line) == [f"python -m pneumonia.fit --resume {run_dir}"]
