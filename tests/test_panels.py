"""The reported model's TensorBoard figures (`pneumonia.run.panels`): every tag sits in a group
TensorBoard shows after every group of curves a run logs, so a run opens on its curves; the
values are the set's scores as they are."""

from __future__ import annotations

import functools

import torch
from conftest import TINY_MODEL

from pneumonia.data.imageset import ImageSet
from pneumonia.run import panels
from pneumonia.run.scores import score_set
from pneumonia.training.recipe import Recipe, build_module

# One tag of each group of curves the runs log: Lightning's (train, val, val_shift, test,
# epoch), a federation's (global, sites, privacy, hparams), cross-site, the lung masks, the
# partition text.
CURVES = [
    "epoch", "train/loss_epoch", "train/epsilon", "val/accuracy", "val/loss", "val_shift/loss",
    "val_shift/confusion_matrix", "test/auroc", "held_out/auroc", "global/val/loss",
    "global/val_shift/auroc", "global/round_seconds", "sites/site2/val/loss", "privacy/epsilon",
    "hparams/best_val_shift_loss", "cross_site/accuracy", "data/lung_masks",
    "partition/text_summary", "lr-AdamW",
]  # fmt: skip


def _is_digit(c: str) -> bool:
    return "0" <= c <= "9"


def _number_end(s: str, i: int) -> int:
    while i < len(s) and (_is_digit(s[i]) or s[i] == "."):
        i += 1
    return i


def tensorboard_order(a: str, b: str) -> int:
    """TensorBoard's `compareTagNames` (tf_backend's vz_sorting, the order of its dashboards'
    tag groups and cards): numbers by value, '/', '_' and digits before any other character,
    the rest by character code."""
    i = j = 0
    while True:
        if i == len(a):
            return 0 if j == len(b) else -1
        if j == len(b):
            return 1
        if _is_digit(a[i]) and _is_digit(b[j]):
            ei, ej = _number_end(a, i), _number_end(b, j)
            x, y = float(a[i:ei]), float(b[j:ej])
            if x != y:
                return -1 if x < y else 1
            i, j = ei, ej
            continue
        a_break, b_break = a[i] in "/_" or _is_digit(a[i]), b[j] in "/_" or _is_digit(b[j])
        if a_break != b_break:
            return -1 if a_break else 1
        if not a_break and a[i] != b[j]:
            return -1 if a[i] < b[j] else 1
        i, j = i + 1, j + 1


class Recorder:
    """A SummaryWriter that keeps what it is given."""

    def __init__(self) -> None:
        self.scalars: dict[str, float] = {}
        self.figures: list[str] = []

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars[tag] = value

    def add_figure(self, tag: str, figure, step: int) -> None:
        self.figures.append(tag)


def test_our_order_is_tensorboards():
    tags = ["val/x", "best/val/x", "val_shift/x", "sites/site10/x", "sites/site2/x", "epoch"]
    ordered = sorted(tags, key=functools.cmp_to_key(tensorboard_order))
    # '/' and '_' are alike to it: val_shift/x comes before val/x ('s' < 'x')
    assert ordered == ["best/val/x", "epoch", "sites/site2/x", "sites/site10/x", "val_shift/x",
                       "val/x"]  # fmt: skip


def test_the_reported_models_tags_come_after_every_curve_and_keep_their_values(tmp_path):
    torch.manual_seed(0)
    module = build_module(Recipe(model=TINY_MODEL, optim={}, image_size=32)).eval()
    n = 24
    images = ImageSet(torch.randint(0, 256, (n, 1, 32, 32), dtype=torch.uint8),
                      torch.arange(n) % 2, [f"p{i}" for i in range(n)],
                      [f"i{i}" for i in range(n)])  # fmt: skip
    scores = score_set(module, "val", images, None, batch_size=32)
    writer = Recorder()
    panels.log_set(writer, module, scores, tmp_path)
    tags = [*writer.scalars, *writer.figures]
    by_order = functools.cmp_to_key(tensorboard_order)
    first, last_curve = min(tags, key=by_order), max(CURVES, key=by_order)
    assert tensorboard_order(last_curve, first) < 0, f"{first} comes before {last_curve}"
    (group,) = {tag.split("/")[0] for tag in tags}  # one group, the panel and cases.png with it
    assert f"{group}/gradcam" in writer.figures and (tmp_path / "cases.png").is_file()
    floats = {k: v for k, v in scores.values.items() if isinstance(v, float)}
    assert writer.scalars == {f"{group}/val/{k}": v for k, v in floats.items()}
