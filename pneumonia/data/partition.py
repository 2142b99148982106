"""Client partitions of the training images: which hospital holds which patients.

Every scheme keeps a patient's images on one client (a patient is seen at one hospital) and is
seeded, disjoint and covering. `iid` is the paper's protocol; `dirichlet` skews the label mix
and `quantity` the client sizes; `sites` takes the hospitals from the data folder itself;
`sites_shift` deals patients as `iid` does, and `pneumonia.data.sites` then images each site's
share in its own way.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Literal

import torch

from pneumonia.core.errors import UserError
from pneumonia.data.imageset import ImageSet

Scheme = Literal["iid", "dirichlet", "quantity", "sites", "sites_shift"]
SITE_SEPARATOR = "/"  # sites: patient ids are "<site>/<patient>", unique only within a site


def patients_by_class(imageset: ImageSet) -> dict[int, dict[str, list[int]]]:
    """class -> patient -> image indices (a patient's class is that of its first image)."""
    images_of = imageset.images_by_patient()
    grouped: dict[int, dict[str, list[int]]] = defaultdict(dict)
    for patient in sorted(images_of):
        grouped[int(imageset.labels[images_of[patient][0]])][patient] = images_of[patient]
    return grouped


def _deal(
    patients: dict[str, list[int]], shares: torch.Tensor, generator: torch.Generator
) -> list[list[int]]:
    """Shuffle patients, then give each to the client furthest below its share of images."""
    names = list(patients)
    order = torch.randperm(len(names), generator=generator).tolist()
    total = sum(len(v) for v in patients.values())
    target = shares / shares.sum() * total
    held = torch.zeros(len(shares))
    out: list[list[int]] = [[] for _ in shares]
    for k in order:
        client = int(torch.argmax(target - held))
        out[client] += patients[names[k]]
        held[client] += len(patients[names[k]])
    return out


def _merge(per_class: list[list[list[int]]], clients: int) -> list[torch.Tensor]:
    # Sorted indices: a single client holds the training images in their original order.
    return [
        torch.tensor(sorted(i for part in per_class for i in part[c]), dtype=torch.long)
        for c in range(clients)
    ]


def partition_iid(imageset: ImageSet, clients: int, seed: int) -> list[torch.Tensor]:
    """Equal sizes and the same class mix on every client (the paper's 3 IID clients)."""
    generator = torch.Generator().manual_seed(seed)
    grouped = patients_by_class(imageset)
    for label, patients in grouped.items():
        if len(patients) < clients:
            raise UserError(
                f"federated.clients {clients} is more than the {len(patients)} patient(s) of "
                f"class {imageset.classes[label]}: use fewer clients or more data"
            )
    shares = torch.ones(clients)
    return _merge([_deal(grouped[c], shares, generator) for c in sorted(grouped)], clients)


def partition_dirichlet(
    imageset: ImageSet, clients: int, alpha: float, seed: int
) -> list[torch.Tensor]:
    """Label skew: each class is spread over the clients in Dirichlet(alpha) proportions;
    a small alpha leaves clients with mostly one class."""
    generator = torch.Generator().manual_seed(seed)
    grouped = patients_by_class(imageset)
    per_class = []
    for label in sorted(grouped):
        shares = _dirichlet(clients, alpha, generator)
        per_class.append(_deal(grouped[label], shares, generator))
    return _merge(per_class, clients)


def partition_quantity(
    imageset: ImageSet, clients: int, alpha: float, seed: int
) -> list[torch.Tensor]:
    """Size skew: client sizes in Dirichlet(alpha) proportions, the same class mix on each."""
    generator = torch.Generator().manual_seed(seed)
    grouped = patients_by_class(imageset)
    shares = _dirichlet(clients, alpha, generator)
    return _merge([_deal(grouped[c], shares, generator) for c in sorted(grouped)], clients)


def _dirichlet(clients: int, alpha: float, generator: torch.Generator) -> torch.Tensor:
    """Dirichlet(alpha) proportions from `generator`'s stream: Gamma(alpha) draws, normalised.
    torch._standard_gamma is private, but it is the only torch sampler of Gamma that takes a
    Generator (torch.distributions draw from the global RNG); a public replacement changes
    every seeded dirichlet and quantity partition, so it stays until torch offers one."""
    gamma = torch._standard_gamma(torch.full((clients,), float(alpha)), generator=generator)
    return gamma.double() / gamma.double().sum() + 1e-12


def site_names(imageset: ImageSet) -> list[str]:
    """The sites present, from "<site>/<patient>" ids, in sorted order."""
    return sorted({p.split(SITE_SEPARATOR, 1)[0] for p in imageset.patients})


def partition_sites(imageset: ImageSet) -> list[torch.Tensor]:
    """One client per site (hospital folder), in sorted site order."""
    sites = site_names(imageset)
    of_image = [p.split(SITE_SEPARATOR, 1)[0] for p in imageset.patients]
    return [
        torch.tensor([i for i, s in enumerate(of_image) if s == site], dtype=torch.long)
        for site in sites
    ]


def partition(
    imageset: ImageSet, scheme: Scheme, clients: int, alpha: float, seed: int
) -> list[torch.Tensor]:
    """Image indices of each client under `scheme`; every client must hold images."""
    if scheme == "sites":
        parts = partition_sites(imageset)
    elif clients < 1:
        raise UserError(f"federated.clients {clients} must be at least 1")
    elif scheme in ("iid", "sites_shift"):  # sites_shift: iid patients, imaged per site
        parts = partition_iid(imageset, clients, seed)
    elif scheme in ("dirichlet", "quantity"):
        if alpha <= 0:
            raise UserError(f"federated.alpha {alpha} must be positive (0.5: strong skew)")
        split = partition_dirichlet if scheme == "dirichlet" else partition_quantity
        parts = split(imageset, clients, alpha, seed)
    else:
        raise UserError(
            f"federated.partition {scheme!r} is unknown: iid, dirichlet, quantity, sites, "
            "sites_shift"
        )
    empty = [j for j, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise UserError(
            f"federated.partition {scheme} left client(s) {', '.join(map(str, empty))} with no "
            f"images: use fewer clients, a larger federated.alpha or another seed"
        )
    return parts


def partition_table(
    imageset: ImageSet, parts: list[torch.Tensor], names: list[str] | None = None
) -> list[dict]:
    """One row per client: images, patients and images per class; with `names` (the site
    folders of partition sites, in the parts' order) its `site_name` after its index."""
    rows = []
    for j, idx in enumerate(parts):
        counts = torch.bincount(imageset.labels[idx], minlength=len(imageset.classes)).tolist()
        patients = {imageset.patients[i] for i in idx.tolist()}
        rows.append(
            {"client": j}
            | ({"site_name": names[j]} if names is not None else {})
            | {"images": len(idx), "patients": len(patients)}
            | dict(zip(imageset.classes, counts, strict=True))
        )
    return rows


def format_table(rows: list[dict]) -> str:
    """The partition table as aligned text (also valid Markdown)."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)
