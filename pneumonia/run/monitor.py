"""What a federated run shows while it runs: a line per round, TensorBoard curves by round,
and the rows of rounds.csv (each client's n and loss, global metrics, privacy spent, MB sent,
wall time)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

from torch.utils.tensorboard import SummaryWriter

from pneumonia.federated.aggregate import ClientUpdate, State
from pneumonia.federated.strategies import ServerDP, Strategy
from pneumonia.metrics.classification import SCALARS
from pneumonia.run.progress import duration

GLOBAL_METRICS = ("loss", *SCALARS)
EVALUATION_SETS = ("val", "val_shift", "test", "held_out")  # Splits.evaluation_sets, in order
SITE_VAL = re.compile(r"^(site\d+)_val_(\w+)$")  # a site's validation figure in a row


class Best(NamedTuple):
    """The best round so far by the monitored metric (step 0: none yet)."""

    step: int
    value: float


def round_row(
    round_number: int,
    *,
    n_clients: int,
    updates: Sequence[ClientUpdate],
    excluded: Sequence[int],
    evaluations: dict[str, dict],
    round_s: float,
    elapsed_s: float,
    extra: dict | None = None,
) -> dict:
    """One row of rounds.csv; clients not sampled or left out have empty cells. With DP-SGD,
    each client's epsilon so far and the round's largest (`epsilon`); `extra`: columns of
    the server's own (server_dp's `server_epsilon`)."""
    used = [u for u in updates if u.client not in excluded]
    row: dict = {
        "round": round_number,
        "clients": ";".join(str(j) for j in sorted({u.client for u in updates} | set(excluded))),
        "excluded": ";".join(map(str, excluded)),
    }
    by_client = {u.client: u for u in used}
    private = any(u.epsilon is not None for u in updates)
    for j in range(n_clients):
        update = by_client.get(j)
        row[f"client{j}_n"] = update.n if update else ""
        row[f"client{j}_loss"] = round(update.train_loss, 5) if update else ""
        if private:  # with DP-SGD every client's update carries its epsilon
            epsilon = update.epsilon if update else None
            row[f"client{j}_epsilon"] = round(epsilon, 4) if epsilon is not None else ""
    total = sum(u.n for u in used)
    row["train_loss"] = round(sum(u.train_loss * u.n for u in used) / total, 5)
    if private:  # the weakest guarantee of the round: the largest epsilon any client spent
        row["epsilon"] = round(max(u.epsilon for u in updates if u.epsilon is not None), 4)
    row |= extra or {}
    for split, values in evaluations.items():
        for key in GLOBAL_METRICS:
            row[f"{split}_{key}"] = round(values[key], 5)
    row["round_s"], row["elapsed_s"] = round(round_s, 1), round(elapsed_s, 1)
    return row


def traffic(global_state: State, updates: Sequence[ClientUpdate], excluded: Sequence[int]) -> dict:
    """MB of model state sent this round, as a rounds.csv column: the global state to each
    sampled client and each update back (full float state dicts, as the round loop and the
    Flower wire copy them; secure aggregation's masking and key shares are not counted)."""
    state_bytes = sum(t.numel() * t.element_size() for t in global_state.values())
    sampled = len({u.client for u in updates} | set(excluded))
    return {"mb_sent": round(state_bytes * (sampled + len(updates)) / 1e6, 3)}


def server_privacy(strategy: Strategy) -> dict:
    """server_dp's epsilon so far, as a rounds.csv column (none without server DP)."""
    if not isinstance(strategy, ServerDP):
        return {}
    return {"server_epsilon": round(strategy.epsilon(), 4)}


def log_round(tensorboard: SummaryWriter, row: dict) -> None:
    """Global curves with the round as the step: global/train/loss, global/val/<metric>, ..."""
    step = row["round"]
    tensorboard.add_scalar("global/train/loss", row["train_loss"], step)
    for key, value in row.items():
        if key.endswith("epsilon") and value != "":
            tensorboard.add_scalar(f"privacy/{key}", value, step)
    for split in EVALUATION_SETS:
        for metric in GLOBAL_METRICS:
            if f"{split}_{metric}" in row:
                tensorboard.add_scalar(f"global/{split}/{metric}", row[f"{split}_{metric}"], step)
    for key, value in row.items():
        if (match := SITE_VAL.match(key)) and match[2] in GLOBAL_METRICS:
            tensorboard.add_scalar(f"sites/{match[1]}/val/{match[2]}", value, step)
    tensorboard.add_scalar("global/round_seconds", row["round_s"], step)
    tensorboard.flush()


def progress_line(row: dict, rounds: int, best: Best, monitor: str) -> str:
    """One line per round: round r/T and its time, the clients' training loss, the global
    model on the clean and shifted validation images, the best round so far, time left. The
    clients are named only when not all of them took part."""
    done = row["round"]
    eta = row["elapsed_s"] / max(done, 1) * (rounds - done)
    width = len(str(rounds))
    sampled = row["clients"].count(";") + 1 < len([k for k in row if k.endswith("_n")])
    clients = f"clients {row['clients'].replace(';', ',')}  " if sampled else ""
    excluded = f"left out {row['excluded'].replace(';', ',')}  " if row["excluded"] else ""
    shift = (
        f" | shift acc {row['val_shift_accuracy']:.3f} auroc {row['val_shift_auroc']:.3f}"
        if "val_shift_accuracy" in row
        else ""
    )
    sites = [row[k] for k in row if (m := SITE_VAL.match(k)) and m[2] == "accuracy"]
    by_site = f" | sites acc {' '.join(f'{v:.3f}' for v in sites)}" if sites else ""
    if "held_out_accuracy" in row:
        by_site += (
            f" | held-out acc {row['held_out_accuracy']:.3f} auroc {row['held_out_auroc']:.3f}"
        )
    privacy = "".join(
        f" | {label} {row[key]:.2f}"
        for key, label in (("epsilon", "epsilon"), ("server_epsilon", "server epsilon"))
        if key in row
    )
    return (
        f"round {done:{width}d}/{rounds} {row['round_s']:4.0f}s  {clients}{excluded}"
        f"train loss {row['train_loss']:.3f} | val acc {row['val_accuracy']:.3f} "
        f"auroc {row['val_auroc']:.3f}{shift}{by_site}{privacy} | best {monitor} {best.value:.3f} "
        f"(round {best.step}) | {duration(eta)} left"
    )
