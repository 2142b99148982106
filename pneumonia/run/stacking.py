"""Trained models as one checkpoint (`python -m pneumonia.ensemble`): stacking or soft voting
of finished runs.

Each member is a run's checkpoints/best.ckpt; its validation predictions come from the run's
predictions.csv (two folders up). The members must share their validation images (the same
data and seed): the images none of them trained on. Stacking fits a logistic regression
(scikit-learn, L2 penalty, C = 1) on the members' logits logit(P(pneumonia)) of those images;
the checkpoint holds the one fitted on all of them. To score it honestly the images are also
cross-fitted, `folds` folds by patient (stratified by class, shuffled by `seed`): each
image's stacked probability comes from a regression fitted on the other folds' patients.
The report (written beside the checkpoint as <out stem>.json) holds accuracy, recall,
specificity, AUROC and log loss at threshold 0.5, with 95% bootstrap intervals over patients,
of the stack (out of fold), the soft vote and each member on the same images; on val_shift
out of fold too, and for the regression fitted on all validation images (optimistic: it has
seen those patients unshifted); on test, when the runs had one, with the regression fitted on
all validation images. The network itself is `pneumonia.models.ensemble_model`.
"""

from __future__ import annotations

import csv
import math
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pneumonia.core.errors import UserError, first_line
from pneumonia.core.files import check_not_input, check_writable_folder, write_json
from pneumonia.data.imageset import CLASSES
from pneumonia.inference.predictor import file_sha256
from pneumonia.metrics.intervals import bootstrap_intervals, weighted_metrics
from pneumonia.models.ensemble_model import EPS, Ensemble, member_config, pneumonia_index
from pneumonia.models.factory import ModelConfig, create_model
from pneumonia.run.rundir import CONFIG, PREDICTIONS, SUMMARY
from pneumonia.training.checkpoint import (
    finish_checkpoint,
    model_card,
    module_from,
    read_checkpoint,
    write_checkpoint,
)
from pneumonia.training.recipe import Recipe

C = 1.0  # the meta-learner's inverse L2 strength: scikit-learn's default, not tuned
THRESHOLD = 0.5
REPORTED = ("accuracy", "recall", "specificity", "auroc", "log_loss")
COLUMNS = ("split", "image", "patient", "positive", "probability")
META_LEARNER = f"scikit-learn LogisticRegression (L2, C={C}) on the members' logits"
CAVEAT = (
    "A research tool, not a diagnostic device: its figures are measured on validation "
    "images cut from its members' training pool, out of fold for the stack (and on those "
    "images under simulated acquisition shifts), which new patients and other hospitals can "
    "fall well short of."
)


@dataclass
class Member:
    """A member checkpoint, read, with its run's predictions."""

    path: Path
    recipe: Recipe
    state: dict
    card: dict
    rows: dict[tuple[str, str], dict]  # (split, image) -> predictions.csv row
    network: nn.Module | None = None  # its network, weights loaded (`member_network`)

    @property
    def model_name(self) -> str:
        return str(self.recipe.model["name"])

    def spec(self) -> dict:
        """What the ensemble's config holds of this member (`pneumonia.models.ensemble_model`)."""
        model = dict(self.recipe.model) | {"pretrained": None}  # the weights come with it
        return {
            "model": model,
            "mean": float(self.recipe.mean),
            "std": float(self.recipe.std),
            "image_size": int(self.recipe.image_size),
            "classes": list(self.recipe.classes),
            "positive_class": self.recipe.positive_class,
            "name": str(self.path),
        }


def read_member(path: str) -> Member:
    """The checkpoint at `path` and its run's predictions.csv, or a one-line UserError."""
    recipe, state, ckpt = read_checkpoint(path)
    if recipe.model["name"] == "ensemble":
        raise UserError(f"{path} is an ensemble already: give the checkpoints of its members")
    try:
        pneumonia_index(recipe.classes, recipe.positive_class)
    except ValueError as err:
        raise UserError(f"{path}: {err}: it cannot vote on pneumonia") from None
    predictions = Path(path).resolve().parent.parent / PREDICTIONS
    rows = read_predictions(predictions)
    card = model_card(ckpt)
    shown = card.get("val", {}).get("n") if isinstance(card.get("val"), dict) else None
    val_rows = sum(split == "val" for split, _ in rows)
    if isinstance(shown, int) and shown != val_rows:
        raise UserError(
            f"{predictions} has {val_rows} validation rows, but {path} was scored on {shown}: "
            f"the file belongs to another model; give best.ckpt inside its own run directory"
        )
    return Member(Path(path), recipe, state, card, rows)


def read_predictions(path: Path) -> dict[tuple[str, str], dict]:
    """A run's predictions.csv as {(split, image): row}, checked."""
    if not path.is_file():
        raise UserError(
            f"{path} not found: a member must be a run's checkpoints/best.ckpt, with the "
            f"run's {PREDICTIONS} two folders up"
        )
    not_a_run = f"so not the {PREDICTIONS} a run writes: give members whose run folder is intact"
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            return checked_rows(reader, path)
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text, {not_a_run}") from None
    # csv's own refusals: a field over csv.field_size_limit(), left at its 128 KB (an image
    # path is at most 4 KB, so no run writes one near it; a process-wide limit is not ours).
    except csv.Error as err:
        raise UserError(
            f"{path} line {reader.reader.line_num}: {first_line(err, 80)}, {not_a_run}"
        ) from None


def checked_rows(reader: csv.DictReader, path: Path) -> dict[tuple[str, str], dict]:
    """The rows of a predictions.csv being read, checked: {(split, image): row}."""
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise UserError(f"{path} lacks column(s) {', '.join(missing)}: is it a run's?")
    rows: dict[tuple[str, str], dict] = {}
    for line, row in enumerate(reader, start=2):
        try:
            p, positive = float(row["probability"]), int(row["positive"])
        except (TypeError, ValueError):
            p, positive = math.nan, -1
        if not 0 <= p <= 1 or positive not in (0, 1):
            raise UserError(
                f"{path} line {line}: probability {row['probability']!r} and positive "
                f"{row['positive']!r} must be a number in [0, 1] and 0 or 1"
            )
        key = (row["split"], row["image"])
        if key in rows:
            raise UserError(f"{path} line {line}: image {key[1]} appears twice in {key[0]}")
        rows[key] = {"patient": row["patient"] or row["image"], "positive": positive, "p": p}
    return rows


@dataclass
class Joined:
    """The members' predictions of one split's images, row for row."""

    images: list[str]
    patients: list[str]
    positive: np.ndarray  # [N] 0/1
    probs: np.ndarray  # [N, K] each member's P(pneumonia)

    @property
    def logits(self) -> np.ndarray:
        return member_logits(self.probs)


def join(members: list[Member], split: str) -> Joined | str:
    """The split's images every member scored, or why they cannot be joined (a sentence)."""
    sets = [{image for s, image in m.rows if s == split} for m in members]
    if not sets[0]:
        return f"{members[0].path}'s run has no {split} images"
    for member, images in zip(members[1:], sets[1:], strict=True):
        if images != sets[0]:
            only = len(images - sets[0]) + len(sets[0] - images)
            return (
                f"{member.path} and {members[0].path} do not share their {split} images "
                f"({len(images)} and {len(sets[0])}, {only} in one only)"
            )
    shared = sorted(sets[0])
    first = [members[0].rows[(split, i)] for i in shared]
    for member in members[1:]:
        rows = [member.rows[(split, i)] for i in shared]
        if any(
            (a["patient"], a["positive"]) != (b["patient"], b["positive"])
            for a, b in zip(first, rows, strict=True)
        ):
            return (
                f"{member.path} and {members[0].path} give some {split} images another "
                f"patient or class"
            )
    return Joined(
        images=shared,
        patients=[r["patient"] for r in first],
        positive=np.array([r["positive"] for r in first], dtype=np.int64),
        probs=np.array([[m.rows[(split, i)]["p"] for m in members] for i in shared]),
    )


def member_logits(probs: np.ndarray) -> np.ndarray:
    """logit(clamp(P, EPS, 1 - EPS)), as the ensemble model computes it."""
    p = np.clip(probs, EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def fit_meta(z: np.ndarray, y: np.ndarray):
    """The stacking meta-learner fitted on member logits `z` [N, K] and outcomes `y` [N]."""
    from sklearn.linear_model import LogisticRegression

    if len(np.unique(y)) < 2:
        raise UserError(
            f"the images the meta-learner is fitted on are all of one class "
            f"({CLASSES[int(y[0])] if len(y) else 'none'}): stacking needs both; use fewer "
            f"--folds, or members validated on more patients"
        )
    # A tight tolerance: with member logits near 0 the loss is flat, and the default (1e-4)
    # stops about 1e-3 short of the optimum in the coefficients.
    return LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(z, y)


def stacked(meta, z: np.ndarray) -> np.ndarray:
    """P(pneumonia) of the stack for member logits `z` [N, K]."""
    return meta.predict_proba(z)[:, 1]


def soft_vote(probs: np.ndarray) -> np.ndarray:
    """The soft vote's P(pneumonia): the members' mean, clamped as the model clamps it."""
    return np.clip(probs.mean(axis=1), EPS, 1 - EPS)


def cross_fit(
    z: np.ndarray, y: np.ndarray, patients: list[str], folds: int, seed: int
) -> tuple[np.ndarray, list, dict[str, int]]:
    """(out-of-fold stacked P(pneumonia) [N], the fold meta-learners, patient -> fold): the
    images split into `folds` folds by patient (stratified by class, shuffled by `seed`), each
    fold's images scored by a meta-learner fitted on the other folds."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_patients = len(set(patients))
    if folds < 2 or folds > n_patients:
        raise UserError(
            f"--folds {folds}: give from 2 to {n_patients} (the validation patients the "
            f"members share)"
        )
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    oof = np.full(len(y), np.nan)
    learners: list = []
    fold_of: dict[str, int] = {}
    with warnings.catch_warnings():  # "fewer members of a class than folds": allowed here
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        splits = list(splitter.split(z, y, groups=patients))
    for k, (train, held_out) in enumerate(splits):
        meta = fit_meta(z[train], y[train])
        oof[held_out] = stacked(meta, z[held_out])
        learners.append(meta)
        fold_of |= {patients[i]: k for i in held_out}
    return oof, learners, fold_of


def figures(probs: np.ndarray, y: np.ndarray, patients: list[str], seed: int) -> dict:
    """The reported metrics at THRESHOLD, with 95% intervals over patients, and n."""
    p, t = torch.from_numpy(np.asarray(probs, dtype=np.float64)), torch.from_numpy(y == 1)
    values = weighted_metrics(p, t, torch.ones(1, len(p), dtype=torch.float64), THRESHOLD)
    ci = bootstrap_intervals(p, t, THRESHOLD, patients, seed=seed)
    named = {"log_loss": "loss"}
    out: dict[str, object] = {k: round(float(values[named.get(k, k)][0]), 4) for k in REPORTED}
    out["ci95"] = {k: ci[named.get(k, k)] for k in REPORTED}
    return out | {"n": len(p), "patients": len(set(patients))}


def labels(members: list[Member]) -> list[str]:
    """Table labels: "member 1 (resnet18)", ..."""
    return [f"member {k + 1} ({m.model_name})" for k, m in enumerate(members)]


def report_split(
    joined: Joined, members: list[Member], stack: dict[str, np.ndarray], seed: int
) -> dict:
    """Each method's figures on one split: the stack's variants, the soft vote, each member."""
    methods = {name: p for name, p in stack.items()}
    methods["soft_vote"] = soft_vote(joined.probs)
    methods |= {name: joined.probs[:, k] for k, name in enumerate(labels(members))}
    args = (joined.positive, joined.patients, seed)
    return {name: figures(p, *args) for name, p in methods.items()}


def other_splits(
    members: list[Member], meta, learners: list, fold_of: dict[str, int], seed: int
) -> tuple[dict, dict[str, str]]:
    """({"val_shift": ..., "test": ...} where the members share them, {split: why not}).
    val_shift holds the validation patients' images shifted: its stack is scored out of fold
    (each image by the fold learner that never saw its patient) and, optimistic, by the
    learner fitted on all validation images; test, by the latter."""
    out, notes = {}, {}
    shift = join(members, "val_shift")
    if isinstance(shift, Joined) and set(shift.patients) <= set(fold_of):
        z = shift.logits
        by_fold = np.array([fold_of[p] for p in shift.patients])
        oof = np.empty(len(z))
        for k, learner in enumerate(learners):
            if (by_fold == k).any():
                oof[by_fold == k] = stacked(learner, z[by_fold == k])
        out["val_shift"] = {
            "images": len(z),
            "patients": len(set(shift.patients)),
            "note": "shifted copies of the validation patients' images: stacking out of fold "
            "as on val; 'stacking (all val)' is the checkpoint's meta-learner, which has seen "
            "these patients unshifted (optimistic)",
            "methods": report_split(
                shift, members, {"stacking": oof, "stacking (all val)": stacked(meta, z)}, seed
            ),
        }
    else:
        notes["val_shift"] = shift if isinstance(shift, str) else "its patients are not val's"
    test = join(members, "test")
    if isinstance(test, Joined):
        out["test"] = {
            "images": len(test.images),
            "patients": len(set(test.patients)),
            "note": "patients no member saw; stacking: the meta-learner fitted on all val",
            "methods": report_split(test, members, {"stacking": stacked(meta, test.logits)}, seed),
        }
    else:
        notes["test"] = test
    return out, notes


def check_members(paths: list[str]) -> list[Member]:
    """Read and check the members: at least two, distinct, one image size."""
    if len(paths) < 2:
        raise UserError(f"--members: give at least 2 checkpoints to combine, not {len(paths)}")
    resolved = [Path(p).resolve() for p in paths]
    twice = next((p for k, p in enumerate(paths) if resolved[k] in resolved[:k]), None)
    if twice is not None:
        raise UserError(f"--members: {twice} is given twice: give each member once")
    members = [read_member(p) for p in paths]
    # An ensemble scores one input: its members must see the same size and part of the image.
    for key, what, fix in (
        ("image_size", "images of different sizes ({} px)", "one image size; train the members "
         "at the same data.image_size"),
        ("roi", "different parts of the image (data.roi: {})", "one input; train the members "
         "with the same data.roi"),
        ("intensity", "differently standardised images (data.intensity: {})", "one input; "
         "train the members with the same data.intensity"),
    ):  # fmt: skip
        if len({getattr(m.recipe, key) for m in members}) > 1:
            shown = ", ".join(f"{m.path} {getattr(m.recipe, key)}" for m in members)
            raise UserError(f"--members see {what.format(shown)}: an ensemble scores {fix}")
    for member in members:
        member.network = member_network(member)
    return members


def member_network(member: Member) -> nn.Module:
    """The member's network as its run built it (loss head and all), checked to be what the
    ensemble's builder rebuilds from its config: a loss that put its own head in place of the
    classifier (l2_softmax, the margin losses) makes a network the builder cannot, and
    l2_softmax's head would even take a plain Linear's weights and score differently."""
    # Its weights come with it: no model.pretrained file is read (it may be long gone).
    recipe = replace(member.recipe, model=member.recipe.model | {"pretrained": None})
    network = module_from(recipe, member.state, member.path).model
    plain = create_model(
        member_config(member.spec()), member.recipe.image_size, len(member.recipe.classes)
    )
    if [type(m) for m in network.modules()] != [type(m) for m in plain.modules()]:
        loss = (member.recipe.loss or {}).get("name", "cross_entropy")
        raise UserError(
            f"{member.path}: loss.name {loss} gave its network a head an ensemble cannot "
            f"rebuild: give members trained with a loss that keeps the model's classifier"
        )
    return network


def build_state(spec: dict, members: list[Member]) -> dict:
    """The ensemble's state dict (`model.` keys), each member's weights loaded into it."""
    model = create_model(ModelConfig(name="ensemble", ensemble=spec))
    assert isinstance(model, Ensemble)
    for member, net in zip(members, model.members, strict=True):
        assert member.network is not None  # check_members built every member's network
        net.load_state_dict(member.network.state_dict())
    return {f"model.{k}": v for k, v in model.state_dict().items()}


def ensemble_spec(members: list[Member], rule: str, coef: list[float], intercept: float) -> dict:
    return {
        "rule": rule,
        "members": [m.spec() for m in members],
        "coef": [float(c) for c in coef],
        "intercept": float(intercept),
    }


def make_card(
    members: list[Member], spec: dict, report: dict, checkpoint_figures: dict[str, dict]
) -> dict:
    """The ensemble's model card: members, rule, coefficients, the figures of its own rule."""
    trained = [m.card.get("trained_on") for m in members]
    fitted = report["val"]
    card = {
        "task": "NORMAL vs PNEUMONIA on chest radiographs; positive class PNEUMONIA",
        "model": "ensemble",
        "ensemble": {
            "rule": spec["rule"],
            "members": [
                {"checkpoint": str(m.path), "sha256": file_sha256(m.path), "model": m.model_name}
                for m in members
            ],
            "coef": spec["coef"],
            "intercept": spec["intercept"],
            "meta_learner": META_LEARNER if spec["rule"] == "stacking" else "none (mean)",
            "fitted_on": f"{fitted['images']} validation images of {fitted['patients']} patients, "
            f"shared by every member",
        },
        "training": {"selected_by": report["how"]},
        "threshold": THRESHOLD,
        "threshold_rule": str(THRESHOLD),
    }
    if trained[0] is not None and all(t == trained[0] for t in trained):
        card["trained_on"] = trained[0]  # every member learned from the same images
    return card | checkpoint_figures | {"caveat": CAVEAT}


def member_files(checkpoint: Path) -> list[Path]:
    """What the ensemble reads of a member, and what its run's summary says of it: none may
    be overwritten by the ensemble's checkpoint or its report."""
    run = Path(checkpoint).resolve().parent.parent
    return [Path(checkpoint), run / PREDICTIONS, run / SUMMARY, run / CONFIG]


def build_ensemble(member_paths: list[str], out: Path, *, rule: str, folds: int, seed: int) -> dict:
    """Check the members, fit the rule on their shared validation images, write the
    checkpoint at `out` and its report beside it (<out stem>.json); the report."""
    report_path = out.with_suffix(".json")
    check_writable_folder("--out", out.parent)
    if out.is_dir() or report_path == out:
        raise UserError(f"--out {out}: give the path of a checkpoint file to write, e.g. e.ckpt")
    members = check_members(member_paths)
    for written in (out, report_path):
        check_not_input("--out", written, [f for m in members for f in member_files(m.path)])
    val = join(members, "val")
    if isinstance(val, str):
        raise UserError(
            f"{val}: the meta-learner must be fitted on images none of the members trained "
            f"on; train every member on the same data with the same seed"
        )
    z, y = val.logits, val.positive
    oof, learners, fold_of = cross_fit(z, y, val.patients, folds, seed)
    meta = fit_meta(z, y)
    k = len(members)
    if rule == "stacking":
        coef, intercept = meta.coef_[0].tolist(), float(meta.intercept_[0])
        how = (
            f"stacking: {META_LEARNER}, fitted on the {len(y)} validation images the members "
            f"share; figures out of fold ({folds} folds by patient)"
        )
    else:
        coef, intercept = [1.0 / k] * k, 0.0
        how = "soft vote: the mean of the members' P(pneumonia)"
    spec = ensemble_spec(members, rule, coef, intercept)
    report: dict = {
        "rule": rule,
        "how": how,
        "meta_learner": META_LEARNER,
        "folds": folds,
        "seed": seed,
        "threshold": THRESHOLD,
        "members": [
            {"label": lbl, "checkpoint": str(m.path)}
            for lbl, m in zip(labels(members), members, strict=True)
        ],
        "stacking": {
            "coef": meta.coef_[0].tolist(),
            "intercept": float(meta.intercept_[0]),
            "fold_coef": [learner.coef_[0].tolist() for learner in learners],
        },
        "val": {
            "images": len(y),
            "patients": len(set(val.patients)),
            "note": f"stacking out of fold: {folds} folds by patient, each scored by "
            f"a meta-learner fitted on the other folds",
            "methods": report_split(val, members, {"stacking": oof}, seed),
        },
    }
    extra, notes = other_splits(members, meta, learners, fold_of, seed)
    report |= extra
    report["not_reported"] = notes
    own = "stacking" if rule == "stacking" else "soft_vote"
    checkpoint_figures = {
        split: report[split]["methods"][own]
        for split in ("val", "val_shift", "test")
        if split in report
    }
    card = make_card(members, spec, report, checkpoint_figures)
    recipe = Recipe(
        model=asdict(ModelConfig(name="ensemble", ensemble=spec)),
        optim=dict(members[0].recipe.optim),
        image_size=members[0].recipe.image_size,
        classes=CLASSES,
        positive_class="PNEUMONIA",
        mean=0.0,
        std=1.0,
        threshold=THRESHOLD,
        roi=members[0].recipe.roi,
        intensity=members[0].recipe.intensity,
    )
    state = build_state(spec, members)
    module_from(recipe, state, out)  # everything that loads it must be able to: check first
    write_checkpoint(out, state, recipe, round_number=0)
    finish_checkpoint(out, read_checkpoint(out)[2], THRESHOLD, card)
    write_json(report_path, report)
    return report
