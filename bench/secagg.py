"""Secure aggregation's cost: the same small federated job over Flower on loopback (a SuperLink
and one SuperNode per client, TLS), once with plain aggregation and once with Flower's SecAgg+
(federated.secure_aggregation true), one after the other on the same federation; seconds per
round from each run's rounds.csv, so what differs is the protocol alone.

A plain round is one message each way per node; a secure round is four (setup, share keys,
train and send the masked update, unmask), each a fresh `flwr-clientapp` process per node,
plus the masking and unmasking arithmetic (a pseudo-random mask per neighbour, the size of
the model).

    python bench/secagg.py [--nodes 3] [--rounds 2] [--config FIT_YAML] [fit options]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import tempfile
from pathlib import Path

from common import machine
from flower import fit_argv, flower_options, round_times

from pneumonia.core.errors import UserError, exit_on_user_error
from pneumonia.flower.launch import Federation


def run(federation: Federation, args: argparse.Namespace, root: Path, secure: bool) -> list[float]:
    """Seconds of each round of the job over `federation`."""
    argv = fit_argv(args, root) + ["--federated.secure_aggregation", str(secure).lower()]
    status = federation.submit(
        {
            "config": str(args.config.resolve()),
            "overrides": shlex.join(argv[2:]),  # all but --config
            "wait-for-nodes": 120,
        },
        echo=lambda line: None,
    )
    if not status["ok"]:
        raise UserError(f"the Flower run (secure_aggregation {secure}) failed: {status['error']}")
    return round_times(Path(status["run_dir"]))


def describe(name: str, rounds: list[float]) -> str:
    listed = ", ".join(f"{s:.1f}" for s in rounds)
    return f"{name}: rounds {listed} s (mean {statistics.mean(rounds):.1f} s)"


@exit_on_user_error
def main() -> None:
    args = flower_options(__doc__)
    if args.nodes < 3:
        raise UserError("secure aggregation needs at least 3 clients: --nodes 3 or more")
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with Federation(tmp / "federation") as federation:
            federation.env["PNEUMONIA_CACHE"] = str(tmp / "cache")
            federation.start_superlink()
            federation.start_partition_nodes(args.nodes)
            plain = run(federation, args, tmp / "plain", secure=False)
            secure = run(federation, args, tmp / "secure", secure=True)
    print(f"{args.nodes} clients x {args.rounds} rounds, {args.config.name}", *args.fit_options)
    print(describe("plain aggregation ", plain))
    print(describe("secure aggregation", secure))
    extra = statistics.mean(secure) - statistics.mean(plain)
    print(
        f"secure aggregation per round: +{extra:.1f} s, "
        f"secure / plain: {statistics.mean(secure) / statistics.mean(plain):.2f}"
    )


if __name__ == "__main__":
    main()
