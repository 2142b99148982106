"""`make flower-demo`: a SuperLink and N SuperNodes on 127.0.0.1 with TLS, a short federation
on the synthetic images, the global metrics after every round; every process it started is
stopped at the end, on Ctrl-C and on failure.

    python -m pneumonia.flower.demo [--nodes 3] [--config configs/flower_demo.yaml] [FIT OPTIONS]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

from pneumonia.core.errors import UserError, exit_on_user_error
from pneumonia.flower.launch import Federation

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "flower_demo.yaml"


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3, help="SuperNodes (= federated.clients)")
    parser.add_argument("--config", type=Path, default=DEMO_CONFIG)
    parser.add_argument("--runs_root", type=Path, default=Path("runs"))
    parser.add_argument("--workdir", type=Path, help="certificates and logs (default: a temp dir)")
    return parser.parse_known_args(argv)


def demo(args: argparse.Namespace, fit_options: list[str]) -> dict:
    if not args.config.is_file():
        raise UserError(f"{args.config} not found: pass --config a fit YAML")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pneumonia-flower-"))
    run_config = {
        "config": str(args.config.resolve()),
        # The ServerApp splits this with shlex: quoted, an option value may hold spaces.
        "overrides": shlex.join(
            ["--federated.clients", str(args.nodes), "--runs_root", str(args.runs_root.resolve())]
            + fit_options
        ),
        "wait-for-nodes": 120,
    }
    started = time.time()
    with Federation(workdir) as federation:
        federation.start_superlink()
        print(f"SuperLink on {federation.address} (TLS, CA {federation.ca})", flush=True)
        federation.start_partition_nodes(args.nodes)
        print(f"{args.nodes} SuperNodes started; logs in {federation.logs}", flush=True)
        status = federation.submit(run_config, echo=lambda line: print(line, flush=True))
    if not status["ok"]:
        raise UserError(f"{status['error']} (logs: {workdir / 'logs'})")
    print(f"federation finished in {time.time() - started:.0f} s; all processes stopped")
    return status


def run(argv: list[str] | None = None) -> dict:
    args, fit_options = parse(sys.argv[1:] if argv is None else argv)
    if args.nodes < 1:
        raise UserError(f"--nodes {args.nodes} must be at least 1")
    # Ctrl-C and `kill` (exit_on_user_error turns both into KeyboardInterrupt): the Federation
    # stops its processes on the way out.
    return demo(args, fit_options)


main = exit_on_user_error(run)

if __name__ == "__main__":
    main()
