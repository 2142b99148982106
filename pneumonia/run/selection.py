"""How a run chooses its reported model (best.ckpt), one definition for epochs and rounds: the
rule in words (summary.json's `selected_by`, the model card, the comparison reports) and the
column that holds the monitored metric in rounds.csv and TensorBoard's HPARAMS tab.

Centralized runs choose by epoch (Lightning's ModelCheckpoint on the monitor), federated runs
by round (`pneumonia.run.rounds`); either may report an average of weights instead."""

from __future__ import annotations

from jsonargparse import Namespace

from pneumonia.federated.options import averaged_rounds

# What a centralized run's best.ckpt holds, by optim.weight_averaging.
EPOCH_WEIGHTS = {"ema": "EMA weights", "swa": "SWA weights", "none": "weights"}


def selection_rule(cfg: Namespace, unit: str) -> str:
    """How best.ckpt was chosen, in words; `unit`: "epoch" or "round"."""
    if unit == "epoch":
        weights = EPOCH_WEIGHTS[cfg.optim.weight_averaging]
        return f"the epoch whose {weights} had the best {cfg.monitor}"
    fed = cfg.federated
    if averaged_rounds(fed) > 0:
        first = fed.rounds - averaged_rounds(fed) + 1
        return f"mean of the global models of rounds {first}-{fed.rounds}"
    return f"the round with the best {cfg.monitor}"


def monitor_column(monitor: str) -> str:
    """The monitored metric's column in rounds.csv ("val/loss" -> "val_loss")."""
    return monitor.replace("/", "_")
