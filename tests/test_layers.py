"""Imports flow one way: data and models at the bottom, the run layer above them, entry points
on top. Read from the source with `ast`, so a lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "pneumonia"
# Bottom to top, in the order data flows through a run; a module belongs to the longest
# prefix that names it. Inside a layer, modules may import each other.
LAYERS = [
    ["pneumonia.core"],  # errors, bounds, files, safeload, interrupt, seeding, registry
    ["pneumonia.data", "pneumonia.models"],  # images in, networks out
    ["pneumonia.metrics"],  # what predictions are worth, with intervals
    ["pneumonia.training"],  # one model's training: module, losses, optimizers, checkpoints
    ["pneumonia.inference"],  # a trained model at work: scoring, Grad-CAM, predictors
    ["pneumonia.federated"],  # clients, server, strategies
    ["pneumonia.run"],  # the fit config and one training job end to end
    ["pneumonia.flower", "pneumonia.compare", "pneumonia.serve"],  # built on runs and models
    [  # the commands, and the public API that sits beside them
        "pneumonia.api",
        "pneumonia.fit",
        "pneumonia.evaluate",
        "pneumonia.compare.__main__",
        "pneumonia.flower.demo",
        "pneumonia.predict",
        "pneumonia.export",
        "pneumonia.serve.__main__",
        "pneumonia.ensemble",
    ],
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(name: str) -> int | None:
    """The layer of a module, by the longest matching prefix; None if it has none."""
    matches = [
        (len(prefix), level)
        for level, prefixes in enumerate(LAYERS)
        for prefix in prefixes
        if name == prefix or name.startswith(prefix + ".")
    ]
    return max(matches)[1] if matches else None


def imported_modules(path: Path) -> set[str]:
    """Every pneumonia module `path` imports. `from P import x` counts as P and as P.x (x may
    be a module: `from pneumonia import fit`); names that are not modules only ever add P's
    own layer, and `import_graph` keeps modules only."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in names if n.startswith("pneumonia.")}


def import_graph(sources: list[Path]) -> dict[str, set[str]]:
    """Module -> the other package modules it imports."""
    graph = {module_name(p): imported_modules(p) for p in sources}
    return {name: (imports & graph.keys()) - {name} for name, imports in graph.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as the modules along it (first repeated last), or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        for nxt in sorted(graph[node]):
            if cycle := visit(nxt, [*path, node]):
                return cycle
        done.add(node)
        return None

    for start in sorted(graph):
        if cycle := visit(start, []):
            return cycle
    return None


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if module_name(p) != "pneumonia")


def test_the_layering_itself_is_what_the_checker_reads():
    assert layer_of("pneumonia.data.cache") == 1
    assert layer_of("pneumonia.compare.report") == 7
    assert layer_of("pneumonia.compare.__main__") == 8  # the longer prefix wins
    assert layer_of("pneumonia.run.job") > layer_of("pneumonia.federated.cohort")
    assert layer_of("pneumonia.elsewhere") is None


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_every_module_has_a_layer_and_imports_only_from_its_own_or_lower(path):
    name = module_name(path)
    own = layer_of(name)
    assert own is not None, f"{name}: add it to a layer in tests/test_layers.py"
    upward = sorted(m for m in imported_modules(path) if (layer_of(m) or 0) > own)
    assert not upward, f"{name} (layer {own}) imports from above: {upward}"


def test_the_checker_catches_an_upward_import(tmp_path):
    fake = tmp_path / "x.py"
    fake.write_text("def f():\n    from pneumonia.run.job import run_job\n")
    assert imported_modules(fake) == {"pneumonia.run.job", "pneumonia.run.job.run_job"}
    assert layer_of("pneumonia.run.job") > layer_of("pneumonia.data.cache")


def test_the_cycle_finder_finds_a_cycle_through_three_modules():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_lazy_imports_and_modules_imported_by_name():
    graph = import_graph(SOURCES)
    # decode imports the DICOM decoder inside a function, only for DICOM inputs.
    assert "pneumonia.data.dicom" in graph["pneumonia.data.decode"]
    assert "pneumonia.fit" in graph["pneumonia.api"]  # from pneumonia import fit


def test_no_import_cycle_anywhere_in_the_package():
    """Inside a layer modules may import each other, but never in a circle (decode and dicom
    once did): one of the two would always start half-initialised."""
    assert find_cycle(import_graph(SOURCES)) is None
