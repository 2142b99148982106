"""Which process of a distributed run this one is, read from its launcher's environment, so a
job knows before any Trainer exists whether it owns the run directory.

A central run on N devices (`trainer.devices N`, `trainer.strategy ddp`) is N processes that all
run the same command: Lightning's launcher starts processes 1..N-1 as copies of the command
when process 0 reaches `trainer.fit`; torchrun and SLURM start all N at once. Only process 0
(the primary) creates and writes the run directory; the others train their share of each
batch and write nothing. Lightning's launcher copies process 0's environment into the copies,
so process 0 names its run directory in `RUN_DIR_ENV` before the fit starts them; processes
started together (torchrun, SLURM) cannot wait for that and need the same `--run_dir`.
"""

from __future__ import annotations

import os

RUN_DIR_ENV = "PNEUMONIA_RUN_DIR"


def is_primary() -> bool:
    """Whether this process owns the run directory: rank 0 of a distributed run, or a process
    nothing launched. Read as Lightning reads it: torchrun's RANK, else its own launcher's
    LOCAL_RANK (on node NODE_RANK), else SLURM's task id. LOCAL_RANK comes before SLURM_PROCID:
    inside a SLURM job that runs one task, Lightning's copies inherit SLURM_PROCID 0."""
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"]) == 0
    if "LOCAL_RANK" in env or "NODE_RANK" in env:
        return int(env.get("LOCAL_RANK", 0)) == 0 and int(env.get("NODE_RANK", 0)) == 0
    return int(env.get("SLURM_PROCID", 0)) == 0
