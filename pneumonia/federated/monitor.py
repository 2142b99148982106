"""What a federated run shows while it runs: a line per round, TensorBoard curves by round,
and the rows of rounds.csv (each client's n and loss, global metrics, wall time)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch.utils.tensorboard import SummaryWriter

from pneumonia.federated.aggregate import ClientUpdate
from pneumonia.metrics import SCALARS

GLOBAL_METRICS = ("loss", *SCALARS)
EVALUATION_SETS = ("val", "val_shift", "test")  # Splits.evaluation_sets, in order


def round_row(
    round_number: int,
    n_clients: int,
    updates: Sequence[ClientUpdate],
    excluded: Sequence[int],
    evaluations: dict[str, dict],
    round_s: float,
    elapsed_s: float,
) -> dict:
    """One row of rounds.csv; clients not sampled or left out have empty cells."""
    used = [u for u in updates if u.client not in excluded]
    row: dict = {
        "round": round_number,
        "clients": ";".join(str(j) for j in sorted({u.client for u in updates} | set(excluded))),
        "excluded": ";".join(map(str, excluded)),
    }
    by_client = {u.client: u for u in used}
    for j in range(n_clients):
        update = by_client.get(j)
        row[f"client{j}_n"] = update.n if update else ""
        row[f"client{j}_loss"] = round(update.train_loss, 5) if update else ""
    total = sum(u.n for u in used)
    row["train_loss"] = round(sum(u.train_loss * u.n for u in used) / total, 5)
    for split, values in evaluations.items():
        for key in GLOBAL_METRICS:
            row[f"{split}_{key}"] = round(values[key], 5)
    row["round_s"], row["elapsed_s"] = round(round_s, 1), round(elapsed_s, 1)
    return row


def log_round(tensorboard: SummaryWriter, row: dict) -> None:
    """Global curves with the round as the step: global/train/loss, global/val/<metric>, ..."""
    step = row["round"]
    tensorboard.add_scalar("global/train/loss", row["train_loss"], step)
    for split in EVALUATION_SETS:
        for metric in GLOBAL_METRICS:
            if f"{split}_{metric}" in row:
                tensorboard.add_scalar(f"global/{split}/{metric}", row[f"{split}_{metric}"], step)
    tensorboard.add_scalar("global/round_seconds", row["round_s"], step)
    tensorboard.flush()


def progress_line(row: dict, rounds: int, best: tuple[int, float], monitor: str) -> str:
    """round r/T, clients, time, global validation metrics, best so far and time left."""
    done = row["round"]
    per_round = row["elapsed_s"] / max(done, 1)
    eta = per_round * (rounds - done)
    excluded = f" (left out: {row['excluded']})" if row["excluded"] else ""
    shift = (
        f"shift acc {row['val_shift_accuracy']:.3f} auroc {row['val_shift_auroc']:.3f}  "
        if "val_shift_accuracy" in row
        else ""
    )
    return (
        f"round {done}/{rounds}  clients {row['clients'].replace(';', ',')}{excluded}  "
        f"{row['round_s']:.0f}s  train loss {row['train_loss']:.3f}  "
        f"val acc {row['val_accuracy']:.3f} auroc {row['val_auroc']:.3f}  {shift}"
        f"best {monitor} {best[1]:.3f} @ round {best[0]}  eta {minutes(eta)}"
    )


def minutes(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
