"""Procedural synthetic chest radiographs: the package's built-in dataset.

Why: a user (or a test) can train, evaluate and explain a model end to end with no download
and no licence question. The images are deliberately coarse frontal (PA) chest films, so
that augmentations, saliency maps and patient-level splits behave as they would on real
data, and the label signal is local, patchy and sometimes faint, so the task is learnable
but not solved at once.

What is drawn, back to front, on a [-1, 1] coordinate grid (x to the image right, y down):
dark background; a bright soft-tissue body (thorax, neck, shoulders); two darker lung fields
(smooth ellipses, narrow at the apex and broad at the base); rib arcs across the lungs;
clavicles; a bright spine / mediastinum column; a heart shadow low in the middle, bulging
to the image right (the patient's left, as on a PA film). Pneumonia adds several blurred,
brighter consolidation blobs with a low-frequency texture inside one or both lungs.
Nuisance structures that mimic it (prominent vessel markings, breast shadows, nipple
shadows) appear in both classes, independent of the label. Every image then gets its own
exposure, a gentle exposure gradient and film grain.

Each patient has one anatomy; their 1..max images re-use it with a slight shift, rotation
and exposure change and new noise, and a pneumonia patient's consolidation pattern is shared
across their images, so images of one patient are correlated, like follow-up films.
Everything is drawn from one `torch.Generator` seeded by `seed`; the global RNG is untouched.
"""

from __future__ import annotations

import math
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from pneumonia.data.imageset import ImageSet

Params = dict[str, Tensor]

_MAX_BLOBS = 4  # consolidation blobs per pneumonia patient, at most
_TEXTURE_CELLS = 6  # grid of the low-frequency consolidation texture, before upsampling
_PIXELS_PER_CHUNK = 1 << 20  # render this many pixels at a time to bound memory

# Pneumonia severity: a fraction of cases is subtle (faint, small), the rest obvious.
_SUBTLE_FRACTION = 0.25
_SUBTLE_SEVERITY = (0.15, 0.30)
_CLEAR_SEVERITY = (0.35, 0.65)


def _uniform(g: torch.Generator, shape: tuple[int, ...], lo: float, hi: float) -> Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=g)


def _coin(g: torch.Generator, shape: tuple[int, ...], p: float) -> Tensor:
    """0/1 floats, 1 with probability p."""
    return (torch.rand(shape, generator=g) < p).float()


_Num = TypeVar("_Num", Tensor, float)


def _sq(t: _Num) -> _Num:
    """Square by multiplication: cheaper than `**` on large CPU tensors."""
    return t * t


def _col(t: Tensor) -> Tensor:
    """[n] -> [n, 1, 1] and [n, k] -> [n, k, 1, 1], to broadcast against pixel grids."""
    return t.reshape(*t.shape, 1, 1)


def _soft_ellipse(
    x: Tensor,
    y: Tensor,
    cx: Tensor | float,
    cy: Tensor | float,
    rx: Tensor | float,
    ry: Tensor | float,
    edge: float,
) -> Tensor:
    """1 inside the ellipse, 0 outside; a sigmoid rim `edge` radii wide keeps edges smooth
    at every image size (no aliasing, no blur pass needed)."""
    r = torch.sqrt(_sq((x - cx) / rx) + _sq((y - cy) / ry) + 1e-8)
    return torch.sigmoid((1.0 - r) / edge)


# --------------------------------------------------------------------------- parameters


def _draw_patients(g: torch.Generator, n: int, pneumonia_fraction: float) -> Params:
    """One anatomy, class and consolidation pattern per patient (all [n] or [n, K])."""
    u = lambda lo, hi: _uniform(g, (n,), lo, hi)  # noqa: E731
    p: Params = {
        "label": _coin(g, (n,), pneumonia_fraction),
        "thorax_w": u(0.78, 0.92),
        "thorax_h": u(1.05, 1.20),
        "thorax_cy": u(0.22, 0.32),
        "lung_cx": u(0.37, 0.45),
        "lung_cy": u(0.00, 0.10),
        "lung_rx": u(0.24, 0.31),
        "lung_ry": u(0.55, 0.68),
        "lung_taper": u(0.15, 0.35),
        "lung_dark": u(0.28, 0.40),
        "rib_spacing": u(0.15, 0.21),
        "rib_curve": u(0.8, 1.6),
        "rib_phase": u(0.0, 1.0),
        "rib_gain": u(0.05, 0.11),
        "clavicle_gain": u(0.0, 0.15),
        "clavicle_y": u(-0.72, -0.60),
        "spine_w": u(0.07, 0.11),
        "spine_gain": u(0.08, 0.16),
        "heart_x": u(0.06, 0.14),
        "heart_y": u(0.36, 0.48),
        "heart_rx": u(0.28, 0.38),
        "heart_ry": u(0.22, 0.30),
        "heart_gain": u(0.05, 0.12),
        "brightness": u(-0.07, 0.07),
        "contrast": u(0.8, 1.15),
        # Confounders: drawn for every patient whatever the class, so they are nuisance,
        # not a label shortcut; a normal film with them looks busier in the lungs.
        "vessel_gain": u(0.02, 0.06) + _coin(g, (n,), 0.3) * u(0.04, 0.10),
        "vessel_freq": u(10.0, 16.0),
        "vessel_phase": u(0.0, 2 * math.pi),
        "breast_gain": _coin(g, (n,), 0.3) * u(0.04, 0.10),
        "nipple_gain": _coin(g, (n,), 0.25) * u(0.08, 0.18),
    }
    subtle = _coin(g, (n,), _SUBTLE_FRACTION)
    severity = subtle * u(*_SUBTLE_SEVERITY) + (1 - subtle) * u(*_CLEAR_SEVERITY)
    p["severity"] = severity * p["label"]
    p.update(_draw_blobs(g, n, subtle))
    # Per-patient consolidation texture, shared by all their images (correlated pattern).
    p["texture"] = torch.randn((n, _TEXTURE_CELLS, _TEXTURE_CELLS), generator=g)
    return p


def _draw_blobs(g: torch.Generator, n: int, subtle: Tensor) -> Params:
    """Consolidation blobs as offsets from a lung centre, in lung radii (all [n, K])."""
    k = (n, _MAX_BLOBS)
    count = torch.randint(1, _MAX_BLOBS + 1, (n,), generator=g)
    active = (torch.arange(_MAX_BLOBS) < count[:, None]).float()
    # Unilateral pneumonia (all blobs in one lung) is commoner than bilateral.
    first_side = torch.where(torch.rand((n, 1), generator=g) < 0.5, -1.0, 1.0)
    bilateral = _coin(g, (n, 1), 0.35)
    other = torch.where(torch.rand(k, generator=g) < 0.5, -1.0, 1.0)
    side = torch.where(bilateral > 0, other, first_side.expand(k))
    # Subtle cases also have smaller blobs.
    radius = _uniform(g, k, 0.12, 0.28) * (1 - 0.4 * subtle[:, None])
    return {
        "blob_active": active,
        "blob_side": side,
        "blob_u": _uniform(g, k, -0.55, 0.55),
        "blob_v": _uniform(g, k, -0.45, 0.70),  # lower lobes more often
        "blob_r": radius,
        "blob_gain": _uniform(g, k, 0.5, 1.0),
    }


def _draw_images(g: torch.Generator, n: int) -> Params:
    """Per-image acquisition changes on top of the patient's anatomy (all [n] or [n, K])."""
    u = lambda lo, hi: _uniform(g, (n,), lo, hi)  # noqa: E731
    return {
        "dx": u(-0.04, 0.04),
        "dy": u(-0.04, 0.04),
        "angle": u(-0.06, 0.06),
        "scale": u(0.96, 1.04),
        "gain": u(0.9, 1.1),
        "offset": u(-0.04, 0.04),
        "grad_angle": u(0.0, 2 * math.pi),
        "grad_gain": u(0.0, 0.12),
        "grain": u(0.02, 0.05),
        "blob_jitter_u": _uniform(g, (n, _MAX_BLOBS), -0.06, 0.06),
        "blob_jitter_v": _uniform(g, (n, _MAX_BLOBS), -0.06, 0.06),
        "blob_jitter_gain": _uniform(g, (n, _MAX_BLOBS), 0.85, 1.15),
        "texture": torch.randn((n, _TEXTURE_CELLS, _TEXTURE_CELLS), generator=g),
    }


# --------------------------------------------------------------------------- anatomy
# Each function takes the coordinate grid as x [1, 1, S] and y [1, S, 1] plus patient
# parameters [m] and returns [m, S, S]: most terms are sums of a row and a column term,
# which keeps the per-pixel work small.


def _body(x: Tensor, y: Tensor, p: Params) -> Tensor:
    """Soft-tissue silhouette: thorax with shoulders, running off the bottom edge, neck."""
    # A superellipse (4th powers): boxier than an ellipse, so the top corners read as
    # shoulders; 1 - r^4 ~ 4 (1 - r) at the rim, hence the 4x wider sigmoid.
    dy = (y - _col(p["thorax_cy"])) / _col(p["thorax_h"])
    r4 = _sq(_sq(x / _col(p["thorax_w"]))) + _sq(_sq(dy))
    thorax = torch.sigmoid((1.0 - r4) / 0.12)
    neck = torch.sigmoid((0.17 - x.abs()) / 0.02)
    return torch.maximum(thorax, neck)


def _lungs(x: Tensor, y: Tensor, p: Params) -> Tensor:
    """Both lung fields as one mask; the heart-side lung is smaller, and each widens
    towards its base like a real lung."""
    cy, ry = _col(p["lung_cy"]), _col(p["lung_ry"])
    depth = ((y - cy) / ry).clamp(-1.0, 1.0)
    rx = _col(p["lung_rx"]) * (1.0 + _col(p["lung_taper"]) * depth)
    cx = _col(p["lung_cx"])
    image_left = _soft_ellipse(x, y, -cx, cy, rx, ry, 0.08)
    image_right = _soft_ellipse(x, y, cx, cy, 0.9 * rx, ry, 0.08)
    return torch.maximum(image_left, image_right)


def _ribs(x: Tensor, y: Tensor, p: Params) -> Tensor:
    """Posterior rib arcs: periodic bright bands, each side an arch that rises from the
    spine and falls laterally (the caller shows them over the lungs, where the contrast
    with air makes them visible)."""
    v = y - _col(p["rib_curve"]) * _sq(x.abs() - 0.3)
    bands = torch.cos(2 * math.pi * (v / _col(p["rib_spacing"]) + _col(p["rib_phase"])))
    bands = bands.clamp(min=0.0)
    return bands * _sq(bands)  # cube: narrow bright bands, wide gaps


def _clavicles(x: Tensor, y: Tensor, p: Params) -> Tensor:
    """Two bars rising from the sternal notch towards the shoulders."""
    v = y - (_col(p["clavicle_y"]) - 0.18 * x.abs())
    span = torch.sigmoid((0.62 - x.abs()) / 0.04) * torch.sigmoid((x.abs() - 0.06) / 0.03)
    return torch.exp(-_sq(v / 0.035)) * span


def _spine(x: Tensor, y: Tensor, p: Params) -> Tensor:
    """Spine and mediastinum: a central column, wider in the upper chest (great vessels)."""
    width = _col(p["spine_w"]) * (1.0 + 0.6 * torch.sigmoid(-(y + 0.1) / 0.15))
    return torch.exp(-_sq(x) / _sq(width))


def _heart(x: Tensor, y: Tensor, p: Params) -> Tensor:
    """Heart shadow low in the middle, bulging to the image right (patient's left)."""
    return _soft_ellipse(
        x, y, _col(p["heart_x"]), _col(p["heart_y"]), _col(p["heart_rx"]), _col(p["heart_ry"]), 0.12
    )


def _vessels(x: Tensor, y: Tensor, p: Params) -> Tensor:
    """Bronchovascular markings: wavy lines radiating from each hilum, fading outwards.
    Strong in some patients of both classes, they imitate perihilar consolidation."""
    dx, dy = x.abs() - 0.12, y - (_col(p["lung_cy"]) - 0.05)
    r = torch.sqrt(_sq(dx) + _sq(dy) + 1e-6)
    theta = torch.atan2(dy, dx)
    lines = torch.cos(_col(p["vessel_freq"]) * theta + _col(p["vessel_phase"]) + 6.0 * r)
    lines = _sq(lines.clamp(min=0.0))
    return lines * _sq(lines) * torch.exp(-r / 0.3)  # 6th power: thin lines


def _soft_tissue_confounders(x: Tensor, y: Tensor, p: Params) -> Tensor:
    """Breast shadows over the lower lungs and small round nipple shadows: bright
    overlapping structures that a careless model may call consolidation."""
    cy = _col(p["lung_cy"])
    breast = _soft_ellipse(x.abs(), y, 0.42, cy + 0.5, 0.32, 0.22, 0.15)
    # A round gaussian is a product of a row and a column profile.
    nipple = torch.exp(-_sq(x.abs() - 0.36) / 0.0018) * torch.exp(-_sq(y - cy - 0.35) / 0.0018)
    return _col(p["breast_gain"]) * breast + _col(p["nipple_gain"]) * nipple


def _render_anatomy(p: Params, size: int) -> Tensor:
    """Each patient's film before acquisition: [m, 2, S, S], channel 0 the intensity,
    channel 1 where lung is visible (consolidation shows only there)."""
    t = torch.linspace(-1.0, 1.0, size)
    x, y = t.view(1, 1, size), t.view(1, size, 1)
    body, lungs = _body(x, y, p), _lungs(x, y, p)
    heart, spine = _heart(x, y, p), _spine(x, y, p)
    # The heart and mediastinum lie in front of / between the lungs and hide them.
    visible = lungs * (1.0 - 0.85 * heart)
    air = visible * (1.0 - spine)
    img = 0.06 + 0.55 * body - _col(p["lung_dark"]) * air
    img = img + _col(p["rib_gain"]) * _ribs(x, y, p) * visible
    img = (
        img
        + (
            _col(p["clavicle_gain"]) * _clavicles(x, y, p)
            + _col(p["spine_gain"]) * spine
            + _soft_tissue_confounders(x, y, p)
        )
        * body
    )
    img = img + _col(p["heart_gain"]) * heart + _col(p["vessel_gain"]) * _vessels(x, y, p) * air
    # Patient-level film contrast and brightness.
    img = (img - 0.4) * _col(p["contrast"]) + 0.4 + _col(p["brightness"])
    return torch.stack([img, visible], dim=1)


# --------------------------------------------------------------------------- pathology


def _consolidation(p: Params, i: Params, size: int) -> Tensor:
    """Pneumonia, in the image frame: gaussian blobs placed relative to a lung, modulated
    by a low-frequency texture (mostly the patient's own, partly new per image). Blobs are
    round, so each is a separable outer product and all of them sum in one batched matmul."""
    ax = p["blob_side"] * p["lung_cx"][:, None]
    ax = ax + (p["blob_u"] + i["blob_jitter_u"]) * p["lung_rx"][:, None]
    ay = p["lung_cy"][:, None] + (p["blob_v"] + i["blob_jitter_v"]) * p["lung_ry"][:, None]
    cx, cy = _to_image_frame(ax, ay, i)
    r2 = 2 * _sq(p["blob_r"] * i["scale"][:, None])[..., None]
    t = torch.linspace(-1.0, 1.0, size)
    gx = torch.exp(-_sq(t - cx[..., None]) / r2)  # [n, K, S]
    gy = torch.exp(-_sq(t - cy[..., None]) / r2)
    gain = p["blob_active"] * p["blob_gain"] * i["blob_jitter_gain"] * p["severity"][:, None]
    blobs = torch.einsum("nki,nkj->nij", gy * gain[..., None], gx)
    texture = _upsample(0.8 * p["texture"] + 0.6 * i["texture"], size)
    return blobs * torch.sigmoid(1.5 * texture + 0.5)  # mottled, mostly > 0.5, never negative


def _upsample(cells: Tensor, size: int) -> Tensor:
    """[n, c, c] noise -> smooth [n, S, S] field: each cell becomes a gaussian bump, so the
    field is blurred by construction; separable, hence two small matmuls per image."""
    c = cells.shape[-1]
    centres = torch.linspace(-1.0, 1.0, c)
    t = torch.linspace(-1.0, 1.0, size)
    w = torch.exp(-_sq(t[:, None] - centres[None, :]) / (2 * _sq(1.6 / (c - 1))))
    w = w / w.sum(dim=1, keepdim=True)  # [S, c]; rows sum to 1, so the field keeps its scale
    return w @ cells @ w.T


# --------------------------------------------------------------------------- acquisition


def _to_image_frame(ax: Tensor, ay: Tensor, i: Params) -> tuple[Tensor, Tensor]:
    """Anatomy-frame points [n, K] -> image-frame points under each image's pose."""
    cos, sin = torch.cos(i["angle"])[:, None], torch.sin(i["angle"])[:, None]
    scale = i["scale"][:, None]
    x = i["dx"][:, None] + scale * (cos * ax - sin * ay)
    y = i["dy"][:, None] + scale * (sin * ax + cos * ay)
    return x, y


def _pose(film: Tensor, i: Params) -> Tensor:
    """Place the patient's film on each image with a slight shift, rotation and scale, the
    inverse of `_to_image_frame` (image point -> anatomy point), by bilinear resampling."""
    cos, sin, s = torch.cos(i["angle"]), torch.sin(i["angle"]), i["scale"]
    dx, dy = i["dx"], i["dy"]
    theta = torch.stack(
        [
            torch.stack([cos / s, sin / s, -(cos * dx + sin * dy) / s], dim=1),
            torch.stack([-sin / s, cos / s, (sin * dx - cos * dy) / s], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, list(film.shape), align_corners=True)
    # Border padding: the body runs on past the bottom edge instead of ending in black.
    return F.grid_sample(film, grid, mode="bilinear", padding_mode="border", align_corners=True)


def _expose(img: Tensor, i: Params, g: torch.Generator) -> Tensor:
    """Per-image exposure, a gentle exposure gradient in a random direction (beam heel
    effect, patient thickness) and film grain; clamps to [0, 1]."""
    size = img.shape[-1]
    t = torch.linspace(-1.0, 1.0, size)
    ramp = _col(torch.cos(i["grad_angle"])) * t.view(1, 1, size) + _col(
        torch.sin(i["grad_angle"])
    ) * t.view(1, size, 1)
    img = img * _col(i["gain"]) + _col(i["offset"]) + 0.5 * _col(i["grad_gain"]) * ramp
    grain = torch.randn(img.shape, generator=g) * _col(i["grain"])
    return (img + grain).clamp(0.0, 1.0)


def _render(p: Params, i: Params, owner: Tensor, size: int, g: torch.Generator) -> Tensor:
    """Images in [0, 1], [n, S, S]: each patient in p is drawn once, then posed, given
    consolidation and exposed once per image; owner maps images to rows of p."""
    film = _pose(_render_anatomy(p, size)[owner], i)
    pi = {k: v[owner] for k, v in p.items()}
    img = film[:, 0] + _consolidation(pi, i, size) * film[:, 1]
    return _expose(img, i, g)


def _check_args(
    n_patients: int, image_size: int, pneumonia_fraction: float, max_images_per_patient: int
) -> None:
    if n_patients < 1:
        raise ValueError(f"n_patients must be at least 1, got {n_patients}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
    if not 0.0 <= pneumonia_fraction <= 1.0:
        raise ValueError(f"pneumonia_fraction must be in [0, 1], got {pneumonia_fraction}")
    if max_images_per_patient < 1:
        raise ValueError(f"max_images_per_patient must be at least 1, got {max_images_per_patient}")


def generate_synthetic(
    n_patients: int = 600,
    image_size: int = 64,
    seed: int = 0,
    pneumonia_fraction: float = 0.6,
    max_images_per_patient: int = 3,
) -> ImageSet:
    """Synthetic frontal chest radiographs, NORMAL (0) vs PNEUMONIA (1), deterministic by seed.

    Each of `n_patients` patients ("synth-0007") has a class (pneumonia with probability
    `pneumonia_fraction`), an anatomy of their own and 1..`max_images_per_patient` images
    ("synth-0007-0", "synth-0007-1", ...) that share it. Returns uint8 images [N, 1, S, S]
    with S = `image_size`, rendered at that size directly. Same seed, same tensors; the
    global RNG is not used.
    """
    _check_args(n_patients, image_size, pneumonia_fraction, max_images_per_patient)
    g = torch.Generator().manual_seed(seed)
    patients = _draw_patients(g, n_patients, pneumonia_fraction)
    counts = torch.randint(1, max_images_per_patient + 1, (n_patients,), generator=g)
    owner = torch.repeat_interleave(torch.arange(n_patients), counts)
    first = torch.cumsum(counts, 0) - counts  # index of each patient's first image
    per_image = _draw_images(g, len(owner))

    # Whole patients per chunk, small enough to stay in cache and bound memory.
    chunk = max(1, _PIXELS_PER_CHUNK // (image_size * image_size * max_images_per_patient))
    images = torch.empty((len(owner), 1, image_size, image_size), dtype=torch.uint8)
    for start in range(0, n_patients, chunk):
        stop = min(start + chunk, n_patients)
        lo = int(first[start])
        hi = int(first[stop]) if stop < n_patients else len(owner)
        p = {k: v[start:stop] for k, v in patients.items()}
        i = {k: v[lo:hi] for k, v in per_image.items()}
        rendered = _render(p, i, owner[lo:hi] - start, image_size, g)
        images[lo:hi, 0] = (rendered * 255.0).round().to(torch.uint8)

    width = max(4, len(str(n_patients - 1)))
    ids = [f"synth-{k:0{width}d}" for k in range(n_patients)]
    names = [f"{ids[k]}-{j}" for k, c in enumerate(counts.tolist()) for j in range(c)]
    return ImageSet(
        images=images,
        labels=patients["label"][owner].long(),
        patients=[ids[k] for k in owner.tolist()],
        names=names,
    )
