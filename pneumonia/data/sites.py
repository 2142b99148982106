"""Simulated hospitals that differ in how they image, and every site's validation patients.

Each site of a federation with `federated.site_shift` (or `partition: sites_shift`) gets one
fixed acquisition profile, drawn from `federated.site_seed` and its index: a tone curve
(gamma), contrast, sharpening or blur, sensor noise, and a lower native resolution. It is
applied once to all of that site's images, training and validation alike: the feature-shift
setting FedBN was written for (Li et al. 2021).

The profiles share kinds with the shift validation (`pneumonia.data.shifts`: gamma, contrast,
blur, noise, lower resolution) but never its severities: every range below stops short of the
mildest shift-validation severity of the same kind, so the shift set stays a shift none of the
sites trained on. Sharpening occurs only at sites; brightness, zoom and another scanner's
intensity window only in the shift validation.

| parameter  | site range                           | shift validation (one kind per image) |
|------------|--------------------------------------|---------------------------------------|
| gamma      | exp(U[-0.22, 0.22]): 0.80-1.25       | exp(+-[0.3, 0.5]): 0.61-0.74, 1.35-1.65 |
| contrast   | 1 + U[-0.2, 0.2]                     | 1 +- [0.25, 0.45]                     |
| blur       | sigma up to 0.01 x side              | sigma 0.012-0.025 x side              |
| sharpening | unsharp mask, amount up to 1.0       | none                                  |
| noise      | Gaussian, std 0.005-0.025            | std 0.03-0.06                         |
| resolution | 0.55-1.0 of the side, scaled back up | 0.35-0.5                              |

Per-site validation: the validation patients are dealt to the sites with each site's own class
mix (its share of each class's training images), so that every site has a validation set that
looks like its training data, for every partition scheme; with `sites` (hospital folders) a
patient's site is its folder.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from pneumonia.data.imageset import ImageSet
from pneumonia.data.intensity import standardize
from pneumonia.data.partition import SITE_SEPARATOR, _deal, patients_by_class
from pneumonia.data.transforms import gaussian_blur


@dataclass(frozen=True)
class SiteProfile:
    """How one site images: applied in this order to images in [0, 1]."""

    resolution: float  # native side as a fraction of the image side (1: full resolution)
    sharpness: float  # < 0: Gaussian blur of sigma |s| x 0.01 x side; > 0: unsharp mask amount s
    contrast: float  # factor about the image mean
    gamma: float  # tone curve x ** gamma
    noise: float  # std of additive Gaussian noise

    def describe(self) -> str:
        edge = (
            f"blur {-self.sharpness:.2f}" if self.sharpness < 0 else f"sharpen {self.sharpness:.2f}"
        )
        return (
            f"resolution {self.resolution:.2f}, {edge}, contrast {self.contrast:.2f}, "
            f"gamma {self.gamma:.2f}, noise {self.noise:.3f}"
        )


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=g))


def site_profile(site: int, seed: int) -> SiteProfile:
    """Site `site`'s profile: the same for the same (seed, site), whatever the site count."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + site)
    return SiteProfile(
        resolution=_uniform(g, 0.55, 1.0),
        sharpness=_uniform(g, -1.0, 1.0),
        contrast=1.0 + _uniform(g, -0.2, 0.2),
        gamma=math.exp(_uniform(g, -0.22, 0.22)),
        noise=_uniform(g, 0.005, 0.025),
    )


def site_profiles(sites: int, seed: int) -> list[SiteProfile]:
    return [site_profile(j, seed) for j in range(sites)]


def apply_profile(
    images: torch.Tensor, profile: SiteProfile, seed: int, chunk: int = 512
) -> torch.Tensor:
    """uint8 [N, 1, S, S] -> the same images as `profile`'s site would have taken them (uint8).
    The noise comes from `seed`, so a set is imaged the same way every time."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty_like(images)
    for start in range(0, len(images), chunk):
        x = images[start : start + chunk].float() / 255.0
        y = _image(x, profile, g).clamp(0.0, 1.0)
        out[start : start + chunk] = torch.round(y * 255.0).to(torch.uint8)
    return out


def _image(x: torch.Tensor, p: SiteProfile, g: torch.Generator) -> torch.Tensor:
    side = x.shape[-1]
    if p.resolution < 1.0:
        small = max(int(round(side * p.resolution)), 4)
        down = F.interpolate(x, size=(small, small), mode="area")
        x = F.interpolate(down, size=(side, side), mode="bilinear", align_corners=False)
    sigma = torch.full((len(x),), max(abs(p.sharpness), 1e-3) * 0.01 * side)
    if p.sharpness < 0:
        x = gaussian_blur(x, sigma)
    elif p.sharpness > 0:
        x = x + p.sharpness * (x - gaussian_blur(x, torch.full((len(x),), 0.01 * side)))
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * p.contrast + mean).clamp(min=0.0)
    x = x.pow(p.gamma)
    return x + p.noise * torch.randn(x.shape, generator=g, dtype=x.dtype)


def image_site(
    imageset: ImageSet, site: int, profile: SiteProfile, seed: int, intensity: str = "none"
) -> ImageSet:
    """`imageset` as site `site` images; `seed` tells this set's noise from another's. Then
    standardised by `intensity` (data.intensity): give the images before standardisation, so
    that it sees what the site's scanner produced."""
    noise_seed = seed * 1_000_003 + 7919 * (site + 1)
    images = apply_profile(imageset.images, profile, noise_seed)
    return replace(imageset, images=standardize(images, intensity))


def profile_rows(profiles: list[SiteProfile]) -> list[dict]:
    return [
        {"site": j} | {k: round(v, 4) for k, v in asdict(p).items()} for j, p in enumerate(profiles)
    ]


def validation_sites(
    val: ImageSet, table: list[dict], seed: int, folders: list[str] | None = None
) -> torch.Tensor:
    """The site of every validation image [N] (long). With hospital `folders` (partition
    `sites`, in client order), a patient's site is its folder (-1: none of them); else each
    class's validation patients are dealt in proportion to the sites' training images of that
    class (`table`: the partition table, one row per site, a column per class)."""
    if folders is not None:
        index = {name: j for j, name in enumerate(folders)}
        return torch.tensor(
            [index.get(p.split(SITE_SEPARATOR, 1)[0], -1) for p in val.patients], dtype=torch.long
        )
    generator = torch.Generator().manual_seed(seed + 104_729)
    out = torch.full((len(val),), -1, dtype=torch.long)
    for label, patients in sorted(patients_by_class(val).items()):
        shares = torch.tensor([float(row[val.classes[label]]) for row in table], dtype=torch.double)
        if shares.sum() <= 0:  # no site trains on this class: deal it evenly
            shares = torch.ones(len(table), dtype=torch.double)
        for j, indices in enumerate(_deal(patients, shares, generator)):
            out[indices] = j
    return out
