"""Grad-CAM heatmaps (Selvaraju et al. 2017) by captum's `LayerGradCam`, and the pictures made
of them: one overlay per image (`predict --cam`'s with its decision and a colour bar:
`cam_figure`), and panels of several images for TensorBoard and reports.

A heatmap shows where a residual stage's features pushed the decision the model made (the
class it predicts), upsampled bilinearly to the image. The stage is the deepest whose grid has
at least `MIN_GRID` cells a side: the last stage at 224 px (7 x 7), the one before at 128 px and
the second at 64 px (8 x 8 each). The last stage alone would give 2 x 2 cells at 64 px, which
can only name a quadrant; an earlier stage is a little less specific to the class (Selvaraju
et al.) but shows where. Each map is scaled to
its own maximum: 1 is the image's most relevant region, not an absolute amount. It says where
the model looked, not what is there: a bright region is not a finding, and a model can be
right for the wrong reasons (text markers, the image border).
"""

from __future__ import annotations

import io
import weakref

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from captum.attr import LayerGradCam
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image
from torch import nn

from pneumonia.core.errors import UserError
from pneumonia.core.figures import subplots
from pneumonia.data.decode import crop_to_roi, to_input
from pneumonia.data.imageset import ImageSet
from pneumonia.data.lungs import (
    WORK_SIDE,
    energy_inside,
    lung_box,
    lung_field,
    pixel_box,
)
from pneumonia.training.module import ClassifierModule

COLORMAP = "jet"  # the convention of Grad-CAM figures: red = most weight
ALPHA = 0.4  # how much of the heatmap covers the radiograph
CAM_INCHES = 6.0  # `cam_figure`: the overlay's longer side, so its text keeps one proportion
CAM_MIN_SIDE = 480  # `cam_figure`: a smaller radiograph's pixels are repeated up to this side
MIN_GRID = 7  # cells a side Grad-CAM reads at (the last ResNet stage's grid at 224 px)
STAGES = ("layer4", "layer3", "layer2")  # the ResNet family's stages, deepest first
# model -> {image side: {stage: its output side}}; weak, so a model freed is forgotten.
_SIDES: weakref.WeakKeyDictionary[nn.Module, dict[int, dict]] = weakref.WeakKeyDictionary()


def target_layer(model: nn.Module, image_size: int | None = None) -> nn.Module:
    """Where Grad-CAM reads: in the ResNet family (timm's `layer4`...), the deepest stage whose
    grid at `image_size` has `MIN_GRID` cells a side (the last stage when no size is given);
    the last convolution of anything else (AlexNet, VGG, most timm models). A model with
    nothing to read says why in its `gradcam_refusal` (scatter_linear): a one-line UserError."""
    refusal = getattr(model, "gradcam_refusal", None)
    if isinstance(refusal, str):
        raise UserError(refusal)
    stages = [
        m for m in (getattr(model, name, None) for name in STAGES) if isinstance(m, nn.Module)
    ]
    if stages:
        sides = _stage_sides(model, stages, image_size) if image_size else {}
        fine = [stage for stage in stages if sides.get(stage, 0) >= MIN_GRID]
        return fine[0] if fine else stages[0]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no convolution for Grad-CAM to read")
    return convs[-1]


def _stage_sides(model: nn.Module, stages: list[nn.Module], image_size: int) -> dict:
    """Each stage's output side at `image_size`, measured once per model and size (a predict
    run asks for every batch)."""
    known = _SIDES.setdefault(model, {})
    if image_size not in known:
        known[image_size] = _grid_sides(model, stages, image_size)
    return known[image_size]


def _grid_sides(model: nn.Module, stages: list[nn.Module], image_size: int) -> dict:
    """Each stage's output side for an image of `image_size`, read from one blank image."""
    sides: dict[nn.Module, int] = {}
    hooks = [
        stage.register_forward_hook(lambda m, _, out: sides.__setitem__(m, out.shape[-1]))
        for stage in stages
    ]
    try:
        param = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(1, 1, image_size, image_size, device=param.device, dtype=param.dtype))
    finally:
        for hook in hooks:
            hook.remove()
    return sides


def explainable(model: nn.Module) -> bool:
    """Whether Grad-CAM can read `model` (`target_layer` refuses neither it nor its layer)."""
    try:
        target_layer(model)
    except (UserError, ValueError):
        return False
    return True


def heatmaps(
    module: ClassifierModule, images: torch.Tensor, batch_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(heatmaps [N, S, S] in [0, 1], P(positive) [N]) for uint8 images [N, 1, S, S]: Grad-CAM
    of the class each image is predicted as, each map scaled to its own maximum (an all-zero
    map means no region supported the decision)."""
    module = module.eval()
    cam = LayerGradCam(module, target_layer(module.model, images.shape[-1]))
    maps, probs = [], []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(module.device).float() / 255.0
        with torch.no_grad():
            logits = module(batch)
            p = module.positive_probability(logits)
        target = decided_class(module, logits, p > float(module.hparams["threshold"]))
        with torch.enable_grad():
            attribution = cam.attribute(batch, target=target, relu_attributions=True)
        size = images.shape[-2:]
        up = F.interpolate(attribution.detach(), size=size, mode="bilinear", align_corners=False)
        maps.append(_unit_scaled(up[:, 0]).cpu())
        probs.append(p.float().cpu())
    return torch.cat(maps), torch.cat(probs)


def _unit_scaled(maps: torch.Tensor) -> torch.Tensor:
    """Each map divided by its own maximum (maps that are all zero stay zero)."""
    peak = maps.flatten(1).amax(1).clamp(min=1e-12).view(-1, 1, 1)
    return (maps / peak).clamp(0, 1)


def overlay(image: torch.Tensor, heat: torch.Tensor) -> np.ndarray:
    """The radiograph (uint8 [1, H, W], any size) with the heatmap ([h, w] in [0, 1],
    resized to it) blended over it: uint8 RGB [H, W, 3]."""
    grey = image[0].float().numpy() / 255.0
    if heat.shape != grey.shape:
        heat = F.interpolate(heat[None, None], size=grey.shape, mode="bilinear")[0, 0]
    colour = matplotlib.colormaps[COLORMAP](heat.numpy())[..., :3]
    blended = (1 - ALPHA) * grey[..., None] + ALPHA * colour
    return (blended * 255).round().clip(0, 255).astype(np.uint8)


def cam_caption(row: dict, positive_class: str) -> tuple[str, str]:
    """(a title line, the class the heatmap explains) for one `predict` row: the decision with
    the probability and threshold it was made on and, from a three-class model, the likelier
    cause, which is then the class explained (`decided_class`)."""
    p, threshold, decision = row["probability"], row["threshold"], row["decision"]
    sign = ">" if decision == positive_class else "<="
    line = f"predicted {decision}: P({positive_class}) {p:.2f} {sign} threshold {threshold:.2f}"
    cause = row.get("cause")
    if cause:
        line += f", likelier cause {cause} (P {row[f'p_{cause}']:.2f})"
    return line, cause or decision


def cam_figure(image: torch.Tensor, heat: torch.Tensor, title: str, explained: str) -> Figure:
    """`predict --cam`'s picture: the radiograph (uint8 [1, H, W]) with its heatmap ([h, w] in
    [0, 1]) blended over it, one overlay pixel per figure pixel (a radiograph smaller than
    `CAM_MIN_SIDE` has each pixel repeated), `title` above it and a colour bar beside it: the
    Grad-CAM relevance for the `explained` class, from 0 (none) to 1 (the image's most)."""
    rgb = overlay(image, heat)
    times = max(1, -(-CAM_MIN_SIDE // max(rgb.shape[:2])))
    rgb = rgb.repeat(times, axis=0).repeat(times, axis=1)
    h, w = rgb.shape[:2]
    dpi = max(h, w) / CAM_INCHES  # text and bar scale with the radiograph
    top, side = round(0.6 * dpi), round(1.5 * dpi)  # pixels: the title's band, the bar's
    width, height = w + side, h + top
    figure = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    figure.figimage(rgb, xo=0, yo=0, origin="upper")  # bottom left, not resampled
    bar = figure.add_axes((
        (w + 0.15 * dpi) / width, 0.05 * h / height, 0.2 * dpi / width, 0.9 * h / height
    ))  # fmt: skip
    scale = ScalarMappable(Normalize(0.0, 1.0), matplotlib.colormaps[COLORMAP])
    figure.colorbar(scale, cax=bar).set_label(
        f"Grad-CAM relevance for {explained}\n(0: none, 1: this image's most)", fontsize=9
    )
    figure.text(0.5 * w / width, 1 - 0.1 * dpi / height, title, ha="center", va="top")
    return figure


def figure_png(figure: Figure) -> bytes:
    """A figure as RGB PNG file bytes (as the overlays before it: no alpha channel), drawn at
    its own dots per inch (so `cam_figure`'s pixels stay)."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return png_bytes(np.asarray(canvas.buffer_rgba())[..., :3].copy())


def png_bytes(rgb: np.ndarray) -> bytes:
    """An RGB (or grey) uint8 array as PNG file bytes."""
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="PNG")
    return out.getvalue()


def panel(
    images: torch.Tensor,
    maps: torch.Tensor,
    titles: list[str],
    columns: int = 4,
    heading: str = "",
) -> Figure:
    """A grid of overlays, one title under each (the figures TensorBoard and reports show)."""
    rows = max(1, -(-len(images) // columns))
    fig, axes = subplots(rows, columns, figsize=(2.4 * columns, 2.7 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, heat, title in zip(axes.flat, images, maps, titles, strict=False):
        ax.imshow(overlay(image, heat))
        ax.set_title(title, fontsize=8)
    if heading:
        fig.suptitle(heading, fontsize=9)
    fig.tight_layout()
    return fig


def decided_class(module: ClassifierModule, logits: torch.Tensor, positive: torch.Tensor):
    """The class each image is decided as: the negative class, or (decided positive) the
    positive class; with three classes, the likelier cause of pneumonia."""
    if module.positive is not None:
        return torch.where(positive, module.positive, 1 - module.positive)
    negative = module.classes.index(module.negative_and_positive[0])
    cause = torch.tensor(module.positives, device=logits.device)[
        logits[:, module.positives].argmax(1)
    ]
    return torch.where(positive, cause, negative)


def describe(p: float, label: int, module: ClassifierModule) -> str:
    """A panel title: the image's true class and the model's P(positive)."""
    positive = module.negative_and_positive[1]
    truth = module.classes[label]
    return f"true {truth}\nP({positive.lower()}) {p:.2f}"


def seeded_panel(module: ClassifierModule, imageset: ImageSet, count: int = 8, seed: int = 0):
    """A fixed set of `count` validation images (the same for every run with this seed and
    these images) with their heatmaps: what training logs at its reported model."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(imageset), generator=generator)[:count].sort().values
    maps, probs = heatmaps(module, imageset.images[index])
    titles = [
        describe(p, int(imageset.labels[i]), module) for p, i in zip(probs, index, strict=True)
    ]
    return panel(imageset.images[index], maps, titles)


def cases_panel(
    module: ClassifierModule, imageset: ImageSet, probs: torch.Tensor, per_kind: int = 4, title=""
) -> Figure:
    """The `per_kind` most confident correct and most confident wrong decisions on `imageset`
    (probabilities `probs`), with their heatmaps: top row correct, bottom row wrong."""
    threshold = float(module.hparams["threshold"])
    targets = module.is_positive(imageset.labels)
    decided = probs > threshold
    confidence = (probs - threshold).abs()
    rows = []
    for correct in (True, False):
        which = torch.nonzero((decided == targets) == correct).flatten()
        order = confidence[which].argsort(descending=True, stable=True)[:per_kind]
        rows.append(which[order].tolist())
    chosen = rows[0] + [None] * (per_kind - len(rows[0])) + rows[1]
    picked = [i for i in chosen if i is not None]
    maps, _ = heatmaps(module, imageset.images[picked]) if picked else (torch.empty(0), None)
    by_index = dict(zip(picked, maps, strict=True))
    blank = torch.zeros_like(imageset.images[0])
    images = [imageset.images[i] if i is not None else blank for i in chosen]
    heat = [by_index[i] if i is not None else torch.zeros(blank.shape[1:]) for i in chosen]
    titles = [
        ("correct, " if n < per_kind else "wrong, ")
        + describe(float(probs[i]), int(imageset.labels[i]), module)
        if i is not None
        else ""
        for n, i in enumerate(chosen)
    ]
    heading = title or "most confident correct (top) and wrong (bottom) decisions"
    if not rows[1]:
        heading += ": no wrong decisions"
    return panel(torch.stack(images), torch.stack(heat), titles, per_kind, heading)


# -- the lung field: masks to look at, and how much of a heat map lies inside it -------------


def lung_panel(fulls: list[torch.Tensor], columns: int = 4):
    """Decoded radiographs [1, H, W] with their lung-field masks (outlined; red: implausible,
    the full image is used) and the crop box: for a reader to judge the segmentation."""
    rows = max(1, -(-len(fulls) // columns))
    figure, axes = subplots(rows, columns, figsize=(3 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, full in zip(axes.flat, fulls, strict=False):
        field = lung_field(full)
        small = F.interpolate(full[None].float(), size=(WORK_SIDE,) * 2, mode="area")[0, 0]
        ax.imshow(small.numpy(), cmap="gray")
        ax.contour(field.mask, levels=[0.5], colors="lime" if field.plausible else "red")
        if field.plausible:
            r0, r1, c0, c1 = pixel_box(lung_box(field.mask), WORK_SIDE, WORK_SIDE)
            ax.add_patch(Rectangle((c0, r0), c1 - c0, r1 - r0, fill=False, color="yellow"))
        ax.set_title("lung field" if field.plausible else field.reason, fontsize=8)
    figure.tight_layout()
    return figure


def lung_energy_share(module: ClassifierModule, full: torch.Tensor, roi: str) -> float:
    """The share of the model's Grad-CAM energy inside the lung field of one decoded
    radiograph [1, H, W], in the full image's frame (a lung-field model's map placed in its
    crop box, zero outside it); nan where the image's lung field is implausible."""
    field = lung_field(full)
    if not field.plausible:
        return float("nan")
    size = int(module.hparams["image_size"])
    view, cropped = crop_to_roi(full, roi)
    intensity = module.hparams.get("intensity", "none")  # the input it was trained on
    cam = heatmaps(module, to_input(view, size, intensity)[None])[0][0]
    canvas = torch.zeros(WORK_SIDE, WORK_SIDE)
    r0, r1, c0, c1 = (
        pixel_box(lung_box(field.mask), WORK_SIDE, WORK_SIDE)
        if cropped and roi == "lungs"
        else (0, WORK_SIDE, 0, WORK_SIDE)
    )
    canvas[r0:r1, c0:c1] = F.interpolate(
        cam[None, None], size=(r1 - r0, c1 - c0), mode="bilinear", align_corners=False
    )[0, 0]
    return energy_inside(canvas, torch.from_numpy(field.mask))
