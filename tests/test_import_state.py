"""Importing the package changes no process-wide setting: torch's denormal flag, the warning
filters, the root logger's handlers and level, pydicom's reading validation, matplotlib's
backend. What a command needs it sets at start-up (`pneumonia.core.startup`), so a notebook
or the Flower app that imports `pneumonia` keeps its own settings.

In a fresh process, the third-party libraries the package imports are imported first (some,
such as Lightning and SciPy, add warning filters of their own when imported): what changes
after that is the package's doing. Opacus is the exception: it gives the root logger a
handler when imported, which `pneumonia.training.privacy` must undo, so it is left to the
package to import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]

PROBE = r"""
import ast, importlib, json, logging, pkgutil, sys, warnings
from pathlib import Path

import matplotlib
import pydicom.config
import torch

import pneumonia

# Third-party libraries whose import-time changes the package itself must undo.
UNDONE_BY_THE_PACKAGE = {"opacus"}


def third_party() -> list[str]:
    names = set()
    for path in Path(pneumonia.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
    top = lambda name: name.split(".")[0]  # noqa: E731
    skip = set(sys.stdlib_module_names) | {"pneumonia"} | UNDONE_BY_THE_PACKAGE
    return sorted(n for n in names if top(n) not in skip)


def state() -> dict:
    root = logging.getLogger()
    return {
        "torch keeps denormals": (torch.tensor([1e-39]) * 1.0).item() != 0,
        "warnings.filters": list(warnings.filters),
        "root logger handlers": list(root.handlers),
        "root logger level": root.level,
        "pydicom reading_validation_mode": pydicom.config.settings.reading_validation_mode,
        "matplotlib backend": matplotlib.rcParams._get_backend_or_none(),
    }


for name in third_party():
    try:
        importlib.import_module(name)
    except Exception:  # an optional library that is not installed: its importers skip below
        pass
before = state()
report = {"changed": [], "skipped": [], "imported": 0}
modules = [
    m.name
    for m in pkgutil.walk_packages(pneumonia.__path__, "pneumonia.")
    if m.name.split(".")[-1] != "__main__"
]
for name in ["pneumonia (its packages)"] + modules:
    if name in modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            if (err.name or "").split(".")[0] != "flwr":
                raise
            report["skipped"].append(name)  # the Flower app, without Flower installed
            continue
        report["imported"] += 1
    now = state()
    report["changed"] += [[name, what] for what in now if now[what] != before[what]]
    before = now
print(json.dumps(report))
"""


def test_importing_every_module_of_the_package_changes_no_process_wide_setting():
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["imported"] > 50, report
    assert report["changed"] == [], report  # [module, what its import changed]
