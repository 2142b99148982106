"""Execute the notebooks into the docs' tutorials (docs/tutorials/*.ipynb, rendered with their
outputs by mkdocs-jupyter; the site does not execute them).

    make fit                                   # the run the first tutorial explores
    python docs/examples/tutorials.py --run runs/default/version_0 --report docs/results/privacy_cpu
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[2]


def execute(name: str, env: dict[str, str]) -> None:
    """Run notebooks/<name>.ipynb from notebooks/ (as Jupyter would) into docs/tutorials/."""
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    os.environ.update(env)
    NotebookClient(
        nb, timeout=600, resources={"metadata": {"path": str(ROOT / "notebooks")}}
    ).execute()
    out = ROOT / "docs" / "tutorials" / f"{name}.ipynb"
    out.parent.mkdir(exist_ok=True)
    # Paths as the repository names them, not as this machine does.
    text = nbformat.writes(nb).replace(f"{ROOT}/", "").replace(str(ROOT), ".")
    out.write_text(text)
    print(f"{out.relative_to(ROOT)} written")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="the run directory explore_run shows")
    parser.add_argument("--report", required=True, help="the report folder compare shows")
    args = parser.parse_args()
    execute("explore_run", {"PNEUMONIA_RUN": str(Path(args.run).resolve())})
    execute("compare", {"PNEUMONIA_REPORT": str(Path(args.report).resolve())})


if __name__ == "__main__":
    main()
