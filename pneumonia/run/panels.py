"""What the reported model shows in pictures: its verdict/* scalars and figures in TensorBoard
(ROC, confusion matrices, per group), its Grad-CAM panel of seeded validation images
(verdict/gradcam), and cases.png, its most confident right and wrong validation decisions
(comparison reports show it beside each entry).

The tags are `GROUP`/...: TensorBoard shows tag groups (the part before the first '/') in the
order of its `compareTagNames` (characters by code, '/', '_' and digits before any other), and
`verdict` comes after every group of curves a run logs (epoch, global, hparams, privacy, sites,
train, val, val_shift, ...), so a run opens on its curves, not on these one-point charts."""

from __future__ import annotations

import logging
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from pneumonia.core.errors import UserError
from pneumonia.inference.explain import cases_panel, seeded_panel, target_layer
from pneumonia.run.rundir import CASES
from pneumonia.run.scores import SetScores
from pneumonia.training.module import ClassifierModule

log = logging.getLogger(__name__)

GROUP = "verdict"  # the reported model's figures, one point each: after every curve's group


def log_set(
    tensorboard: SummaryWriter, module: ClassifierModule, scores: SetScores, run_dir: Path
) -> None:
    """verdict/<set>/*: the set's scalars and figures (the Grad-CAM panels with val's)."""
    name = scores.name
    if scores.per_class is not None:
        figure = scores.per_class.confusion_figure()
        tensorboard.add_figure(f"{GROUP}/{name}/confusion_matrix_classes", figure, 0)
    for family, figures in scores.breakdowns.get(f"{name}_by_group", {}).items():
        tensorboard.add_scalar(f"{GROUP}/{name}_by_group/{family}", figures["accuracy"], 0)
    for key, value in scores.values.items():
        if isinstance(value, float):
            tensorboard.add_scalar(f"{GROUP}/{name}/{key}", value, 0)
    for fig_name, figure in scores.metrics.figures(module.negative_and_positive).items():
        tensorboard.add_figure(f"{GROUP}/{name}/{fig_name}", figure, 0)
    if name == "val":
        log_heatmaps(tensorboard, module, scores, run_dir)


def log_heatmaps(
    tensorboard: SummaryWriter, module: ClassifierModule, val: SetScores, run_dir: Path
) -> None:
    """Grad-CAM of the reported model: a fixed, seeded panel of validation images in
    TensorBoard (verdict/gradcam), and its most confident correct and wrong validation decisions
    in cases.png; none for a model Grad-CAM cannot read (scatter_linear), which says why."""
    try:
        target_layer(module.model)
    except UserError as err:  # the model's one line says why
        log.info("no Grad-CAM panels: %s", err)
        return
    tensorboard.add_figure(f"{GROUP}/gradcam", seeded_panel(module, val.imageset), 0)
    figure = cases_panel(module, val.imageset, val.probs)
    figure.savefig(run_dir / CASES, dpi=110)
