"""`python -m pneumonia.fit`: train one classifier, centrally or federated, into a complete
run directory.

    python -m pneumonia.fit                                   # synthetic data, CPU-sized
    python -m pneumonia.fit --config configs/fl_se_resnet_gn_cpu.yaml \\
        --data.root ../shared/data/chest_xray/train
    python -m pneumonia.fit --resume runs/fl_se_resnet_gn_cpu/version_0
"""

from __future__ import annotations

import sys

from pneumonia.core.errors import exit_on_user_error
from pneumonia.run.config import parse_fit_config
from pneumonia.run.job import run_job
from pneumonia.run.progress import Progress


def run(argv: list[str] | None = None, progress: Progress | None = None) -> dict:
    """Parse the command line and run the job; the summary. Raises UserError (`main` prints it
    as one line)."""
    cfg, config_yaml, resume = parse_fit_config(sys.argv[1:] if argv is None else argv)
    return run_job(cfg, config_yaml, resume, progress)


main = exit_on_user_error(run)


if __name__ == "__main__":
    main()
