"""The reported model's card: what a user of the model should know, as plain values that
travel in best.ckpt (pneumonia.training.checkpoint's `model_card`): the data it learned from,
how it was chosen, its figures with intervals, its threshold, its privacy guarantees.

The data is named by data.root's folder name and a short hash of its sorted file list
(`pneumonia.data.sources.files_identity`), never by a path of the machine it trained on; cards
written before say the path the run was given, and still load and show as they are."""

from __future__ import annotations

from pneumonia.data.sources import Splits
from pneumonia.metrics.classification import SCALARS

CAVEAT = (
    "A research tool, not a diagnostic device: its figures are measured on validation "
    "images cut from its own training pool (and on those images under simulated acquisition "
    "shifts), which new patients and other hospitals can fall well short of."
)
# What each kind of guarantee in summary.json's `privacy` protects.
PROTECTS = {
    "dp_sgd": "one training image",
    "clients": "one training image of one hospital (per hospital's own accountant)",
    "server": "a whole hospital's participation",
}


def model_card(summary: dict, splits: Splits, config: dict, positive: str) -> dict:
    """The card of the model `summary` describes, trained on `splits` under `config`."""
    card = {
        "task": f"{' vs '.join(splits.train.classes)} on chest radiographs; positive class "
        f"{positive}",
        "trained_on": trained_on(splits, config),
        "training": {"selected_by": summary["selected_by"]}
        | ({"federated": _federation(summary["federated"])} if "federated" in summary else {}),
        "model": config["model"]["name"],
        "threshold": summary["threshold"],
        "threshold_rule": summary["threshold_rule"],
        "seed": config.get("seed"),
    }
    for name in ("val", "val_shift", "test", "held_out"):  # test: a data.root with a test/
        if name in summary:
            card[name] = _figures(summary[name])
    if "worst_group" in summary:  # the group the model serves worst, beside the averages
        card["worst_group"] = summary["worst_group"]
    if "privacy" in summary:
        card["privacy"] = privacy_statement(summary["privacy"])
    card["caveat"] = CAVEAT
    return card


def trained_on(splits: Splits, config: dict) -> dict:
    """The training images: where from (data.root's folder name and the hash of its file
    list, never the training machine's path: the card travels with the model), how many."""
    train = splits.train
    return {
        "source": splits.files or splits.source,
        "images": len(train),
        "patients": len(set(train.patients)),
        "per_class": dict(zip(train.classes, train.class_counts(), strict=True)),
        "image_size": config["data"]["image_size"],
    }


def privacy_statement(privacy: dict) -> dict:
    """Each guarantee as (epsilon, delta) with what it protects."""
    return {
        name: {
            "mechanism": values["mechanism"],
            "epsilon": values["epsilon"],
            "delta": values["delta"],
            "protects": PROTECTS[name],
        }
        for name, values in privacy.items()
    }


def _federation(fed: dict) -> dict:
    return {k: fed[k] for k in ("strategy", "partition", "clients", "rounds", "local_epochs")}


def _figures(values: dict) -> dict:
    """Scalar metrics rounded, each with its 95% interval, and n."""
    ci = values.get("ci95", {})
    out = {k: round(values[k], 4) for k in SCALARS if k in values}
    out["ci95"] = {k: [round(lo, 4), round(hi, 4)] for k, (lo, hi) in ci.items() if k in out}
    return out | {"n": values["n"]}
