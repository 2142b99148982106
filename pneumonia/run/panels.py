"""What the reported model shows in pictures: its best/* scalars and figures in TensorBoard
(ROC, confusion matrices, per group), its Grad-CAM panel of seeded validation images
(best/gradcam), and cases.png, its most confident right and wrong validation decisions
(comparison reports show it beside each entry)."""

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


def log_set(
    tensorboard: SummaryWriter, module: ClassifierModule, scores: SetScores, run_dir: Path
) -> None:
    """best/<set>/*: the set's scalars and figures (the Grad-CAM panels with val's)."""
    name = scores.name
    if scores.per_class is not None:
        figure = scores.per_class.confusion_figure()
        tensorboard.add_figure(f"best/{name}/confusion_matrix_classes", figure, 0)
    for family, figures in scores.breakdowns.get(f"{name}_by_group", {}).items():
        tensorboard.add_scalar(f"best/{name}_by_group/{family}", figures["accuracy"], 0)
    for key, value in scores.values.items():
        if isinstance(value, float):
            tensorboard.add_scalar(f"best/{name}/{key}", value, 0)
    for fig_name, figure in scores.metrics.figures(module.negative_and_positive).items():
        tensorboard.add_figure(f"best/{name}/{fig_name}", figure, 0)
    if name == "val":
        log_heatmaps(tensorboard, module, scores, run_dir)


def log_heatmaps(
    tensorboard: SummaryWriter, module: ClassifierModule, val: SetScores, run_dir: Path
) -> None:
    """Grad-CAM of the reported model: a fixed, seeded panel of validation images in
    TensorBoard (best/gradcam), and its most confident correct and wrong validation decisions
    in cases.png; none for a model Grad-CAM cannot read (scatter_linear), which says why."""
    try:
        target_layer(module.model)
    except UserError as err:  # the model's one line says why
        log.info("no Grad-CAM panels: %s", err)
        return
    tensorboard.add_figure("best/gradcam", seeded_panel(module, val.imageset), 0)
    figure = cases_panel(module, val.imageset, val.probs)
    figure.savefig(run_dir / CASES, dpi=110)
