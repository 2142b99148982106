"""The README and the docs quote figures; every quoted figure with an interval must be one a
generated result file under docs/results/<study>/ holds (a report's results.md or .csv, a run's
summary.json, an ablation table), so a misquote or a stale copy fails here. Figures whose run
was measured before its files were kept are listed, page by page, in unsourced.txt: a listed
figure that is no longer quoted fails too, so the list only shrinks."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "results"
UNSOURCED = Path(__file__).with_name("unsourced.txt")
# "0.946 (0.929-0.961)" as pages print a figure; "[0.929, 0.961]" as some tables do.
QUOTED = re.compile(r"(\d\.\d{3}) \((\d\.\d{3})[-–](\d\.\d{3})\)")
BRACKETED = re.compile(r"(\d\.\d{3}) \[(\d\.\d{3}), (\d\.\d{3})\]")
Figure = tuple[str, str, str]


def _r(x: object) -> str:
    return f"{float(str(x)):.3f}"


def _from_text(text: str) -> set[Figure]:
    return set(QUOTED.findall(text)) | set(BRACKETED.findall(text))


def _from_csv(path: Path) -> set[Figure]:
    """value, value_low, value_high columns (compare's results.csv), and printed figures."""
    out: set[Figure] = set()
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                low, high = row.get(f"{key}_low"), row.get(f"{key}_high")
                if key and value and low and high:
                    try:
                        out.add((_r(value), _r(low), _r(high)))
                    except ValueError:
                        continue
            out |= _from_text(",".join(str(v) for v in row.values()))
    return out


def _from_json(node: object) -> set[Figure]:
    """Every metric with its ci95 bounds, at any depth of a summary.json."""
    out: set[Figure] = set()
    if isinstance(node, dict):
        ci = node.get("ci95")
        for metric, bounds in ci.items() if isinstance(ci, dict) else []:
            value = node.get(metric)
            bounded = isinstance(bounds, list) and len(bounds) == 2 and None not in bounds
            if isinstance(value, (int, float)) and bounded:
                out.add((_r(value), _r(bounds[0]), _r(bounds[1])))
        for child in node.values():
            out |= _from_json(child)
    elif isinstance(node, list):
        for child in node:
            out |= _from_json(child)
    return out


def generated_figures(results: Path = RESULTS) -> set[Figure]:
    out: set[Figure] = set()
    for path in results.glob("*/**/*"):  # in a study's folder, not the pages beside them
        if path.suffix in (".md", ".txt"):
            out |= _from_text(path.read_text(errors="ignore"))
        elif path.suffix == ".csv":
            out |= _from_csv(path)
        elif path.suffix == ".json":
            out |= _from_json(json.loads(path.read_text()))
    return out


def quoting_pages() -> list[Path]:
    """The README and every written page; a study folder's generated files are sources."""
    pages = [ROOT / "README.md", ROOT / "CHANGELOG.md"] + sorted((ROOT / "docs").glob("*.md"))
    pages += sorted((ROOT / "docs" / "design").glob("*.md"))
    return pages + sorted(RESULTS.glob("*.md"))


def unsourced() -> dict[str, set[str]]:
    listed: dict[str, set[str]] = {}
    for line in UNSOURCED.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            page, figure = line.split(": ", 1)
            listed.setdefault(page, set()).add(figure.strip())
    return listed


@pytest.fixture(scope="module")
def sources() -> set[Figure]:
    return generated_figures()


def test_every_quoted_figure_is_in_a_generated_file(sources: set[Figure]) -> None:
    listed = unsourced()
    wrong = []
    for page in quoting_pages():
        name = page.relative_to(ROOT).as_posix()
        for m in QUOTED.finditer(page.read_text()):
            if m.groups() not in sources and m.group(0) not in listed.get(name, set()):
                wrong.append(f"{name}: {m.group(0)}")
    assert not wrong, "figures no generated file under docs/results/ holds:\n" + "\n".join(wrong)


def test_the_unsourced_list_only_names_figures_quoted_and_still_without_a_source(
    sources: set[Figure],
) -> None:
    stale = [
        f"{page}: {figure}"
        for page, figures in unsourced().items()
        for figure in figures
        if figure not in (ROOT / page).read_text() or QUOTED.fullmatch(figure).groups() in sources  # type: ignore[union-attr]
    ]
    assert not stale, "drop these lines from tests/docs/unsourced.txt:\n" + "\n".join(stale)


def test_each_kind_of_source_is_read_and_a_misquote_is_not_found(tmp_path: Path) -> None:
    study = tmp_path / "study"
    study.mkdir()
    (study / "results.csv").write_text(
        "entry,val_auroc,val_auroc_low,val_auroc_high\na,0.9871,0.981,0.993\n"
    )
    summary = {"val": {"auroc": 0.5, "ci95": {"auroc": [0.4, 0.6], "ece": [None, None]}}}
    (study / "summary.json").write_text(json.dumps(summary))
    (study / "ablation.md").write_text("| base | 0.839 [0.809, 0.868] |\n")
    (tmp_path / "page.md").write_text("0.111 (0.100-0.120)")  # a page beside, not a source
    found = generated_figures(tmp_path)
    assert found == {
        ("0.987", "0.981", "0.993"),
        ("0.500", "0.400", "0.600"),
        ("0.839", "0.809", "0.868"),
    }
    assert ("0.988", "0.981", "0.993") not in found


def test_readme_fits_a_few_screens() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
