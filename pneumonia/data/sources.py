"""Where images come from: a Kermany-style folder (decoded once, cached) or the generator.

`load_splits` is the one entry: config in, train/val(/test) ImageSets out, with the
validation split drawn from the training images by patient.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from pneumonia.core.bounds import (
    FractionUpToOne,
    ImageSide,
    NonNegativeInt,
    OpenUnitInterval,
    PositiveInt,
    SyntheticPatients,
)
from pneumonia.core.caches import default_cache_dir
from pneumonia.core.errors import UserError
from pneumonia.data.cache import load_or_decode
from pneumonia.data.decode import CorruptImageError, prepare, read_image
from pneumonia.data.imageset import ImageSet
from pneumonia.data.intensity import Intensity, standardize
from pneumonia.data.kermany import find_sites, find_splits, folder_classes, list_image_files
from pneumonia.data.partition import SITE_SEPARATOR
from pneumonia.data.progressive import ProgressiveConfig
from pneumonia.data.shifts import ShiftConfig, shifted
from pneumonia.data.split import split_by_patient
from pneumonia.data.synthetic import generate_synthetic
from pneumonia.data.tasks import Task, for_task
from pneumonia.data.transforms import AugmentConfig

MIN_IMAGE_SIZE = 16


@dataclass
class SyntheticConfig:
    """The embedded synthetic radiographs (used when `data.root` is not set)."""

    n_patients: SyntheticPatients = 600  # patients to draw (one or more images each)
    pneumonia_fraction: OpenUnitInterval = 0.6  # both classes, or no two-class model


@dataclass
class DataConfig:
    """Data source, split, batching and augmentation (the `data.*` config group)."""

    # A Kermany-style folder: class folders (NORMAL/, PNEUMONIA/), or train/, val/ and test/
    # splits of them. null: synthetic images (data.synthetic.*).
    root: str | None = None
    # binary: NORMAL vs PNEUMONIA; three_class: NORMAL, BACTERIA, VIRUS (from Kermany's file
    # names, or from three class folders): pneumonia.data.tasks.
    task: Task = "binary"
    image_size: ImageSide = 224  # side of the square images the model sees, in pixels
    # full: the whole radiograph; lungs: the box of its lung field (a classical segmentation,
    # pneumonia.data.lungs; the whole image where the mask is implausible), then resized.
    roi: Literal["full", "lungs"] = "full"
    # Each image's grey levels standardised after the resize (pneumonia.data.intensity), so
    # that inputs vary less with the scanner: none (as decoded), equalize (global histogram
    # equalisation) or clahe (contrast-limited adaptive equalisation). The checkpoint keeps
    # it: prediction, serving and ONNX standardise new images alike.
    intensity: Intensity = "none"
    # Share of the training images (val/ included) held out for validation, by patient.
    val_fraction: OpenUnitInterval = 0.15
    # Train on this fraction of the training patients (stratified by class, seeded; the
    # validation split is unchanged): a small hospital's data set, as transfer learning meets it.
    train_fraction: FractionUpToOne = 1.0
    # Another run's split.csv: validate on the patients it validated on (the rest train).
    # Transfer learning needs it: a target scored on patients its source model trained on
    # would look better than it is.
    split_from: str | None = None
    batch_size: PositiveInt = 32  # training images per optimizer step
    eval_batch_size: PositiveInt = 128  # images per batch when scoring (no gradients)
    # How the classes' sizes are evened out: loss_weights (each class's loss weighted by
    # N / (K n_c) over the images a trainer sees), sampler (batches drawn class-balanced) or
    # none.
    balance: Literal["none", "loss_weights", "sampler"] = "loss_weights"
    skip_corrupt: bool = False  # leave out images that cannot be decoded; false: stop there
    # Where decoded images are kept between runs; null: $PNEUMONIA_CACHE or
    # ~/.cache/pneumonia.
    cache_dir: str | None = None
    num_workers: NonNegativeInt = 0  # tensors are decoded already; workers only add start-up time
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Low resolution early, data.image_size for the last part of training: progressive.py.
    progressive: ProgressiveConfig = field(default_factory=ProgressiveConfig)
    shift: ShiftConfig = field(default_factory=ShiftConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class Splits:
    """The images of one run, and a line saying where they came from. `val_shift` holds the
    validation patients under acquisition shifts (`pneumonia.data.shifts`), or None. A
    federated run adds `val_site`, the site of each validation image, and with
    federated.hold_out `held_out`: every image of the site that trained nowhere.

    With data.intensity other than none, `raw_train` and `raw_val` are the same images (same
    order) before standardisation: simulated re-imaging (federated.site_shift: the cohort and
    `pneumonia.run.sites`) starts from them and standardises after, as a model would see
    another scanner's images. None with none (the images are their own raw versions)."""

    train: ImageSet
    val: ImageSet
    test: ImageSet | None
    source: str
    val_shift: ImageSet | None = None
    val_site: torch.Tensor | None = None
    held_out: ImageSet | None = None
    raw_train: ImageSet | None = None
    raw_val: ImageSet | None = None
    # data.root's folder name and a hash of its file list (`files_identity`), None for
    # synthetic data: what a model card says it learned from, without the machine's path.
    files: str | None = None

    def evaluation_sets(self) -> dict[str, ImageSet]:
        """The sets a model is scored on after each epoch or round, by name."""
        named = {
            "val": self.val,
            "val_shift": self.val_shift,
            "test": self.test,
            "held_out": self.held_out,
        }
        return {name: images for name, images in named.items() if images is not None}


def load_images(cfg: DataConfig, seed: int, sites: bool = False) -> dict[str, ImageSet]:
    """Every split the source has ("train", maybe "val" and "test"), decoded and standardised
    (data.intensity). With `sites`, each sub-folder of the root is a hospital and patient ids
    become "<site>/<patient>"."""
    return _load_images(cfg, seed, sites)[0]


def _load_images(
    cfg: DataConfig, seed: int, sites: bool, keep_raw: bool = False, listed: list | None = None
) -> tuple[dict[str, ImageSet], dict[str, ImageSet] | None]:
    """(`load_images`, with `keep_raw` and data.intensity other than none the same splits
    before standardisation, else None). Both come from the cache: the standardised file is
    made from the other one."""
    if cfg.image_size < MIN_IMAGE_SIZE:
        raise UserError(
            f"data.image_size {cfg.image_size} is too small: use at least {MIN_IMAGE_SIZE}"
        )
    if cfg.root is None:
        if sites:
            raise UserError(
                "federated.partition sites needs data.root with one sub-folder per hospital"
            )
        s = cfg.synthetic
        images = generate_synthetic(s.n_patients, cfg.image_size, seed, s.pneumonia_fraction)
        if cfg.roi == "lungs":
            images = replace(images, images=crop_all(images.images, cfg.image_size))
        raw = {"train": for_task(images, cfg.task, seed, synthetic=True)}
        if cfg.intensity == "none":
            return raw, None
        standardised = {k: standardized(v, cfg.intensity) for k, v in raw.items()}
        return standardised, raw if keep_raw else None
    # first: it caches the un-standardised images too
    splits = _load_root(cfg, cfg.root, sites, listed)
    if cfg.intensity == "none" or not keep_raw:
        return splits, None
    return splits, _load_root(replace(cfg, intensity="none"), cfg.root, sites)


def standardized(imageset: ImageSet, intensity: str) -> ImageSet:
    """`imageset` with its images standardised (`pneumonia.data.intensity.standardize`)."""
    return replace(imageset, images=standardize(imageset.images, intensity))


def _load_root(
    cfg: DataConfig, root: str, sites: bool, listed: list | None = None
) -> dict[str, ImageSet]:
    """The splits of `root`, cfg's data.root (with `sites`, each hospital folder's,
    concatenated); `listed` receives every file's path relative to `root`."""
    if not sites:
        return _load_folder(cfg, root, listed=listed)
    folders = find_sites(root).items()
    per_site = {site: _load_folder(cfg, folder, site, listed) for site, folder in folders}
    out: dict[str, ImageSet] = {}
    for site_splits in per_site.values():
        for split, images in site_splits.items():
            out[split] = concat(out[split], images) if split in out else images
    return out


def _load_folder(
    cfg: DataConfig, root: str | Path, site: str | None = None, listed: list | None = None
) -> dict[str, ImageSet]:
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    out = {}
    for split, folder in find_splits(root).items():
        label = f"{site}/{split}" if site else split
        files = list_image_files(folder)
        if listed is not None and cfg.root is not None:
            listed += [os.path.relpath(f.path, cfg.root) for f in files]
        images = load_or_decode(
            files,
            cfg.image_size,
            cache_dir,
            cfg.skip_corrupt,
            f"decode {label}",
            cfg.roi,
            cfg.intensity,
        )
        images = for_task(replace(images, classes=folder_classes(folder)), cfg.task)
        if site is not None:  # patient ids are unique only within a hospital
            images = replace(
                images,
                patients=[f"{site}{SITE_SEPARATOR}{p}" for p in images.patients],
                names=[f"{site}/{n}" for n in images.names],
            )
        out[split] = images
    return out


def load_splits(cfg: DataConfig, seed: int, sites: bool = False) -> Splits:
    """Train and validation by patient from the training images (plus a folder's val/, which
    in Kermany is too small to be a validation set alone), and the test split if any.

    With data.intensity, the shift validation re-images the validation patients before
    standardising them (as a model would meet another scanner's images), and `raw_train` /
    `raw_val` keep the un-standardised images for the site profiles."""
    listed: list[str] = []
    images, raw = _load_images(cfg, seed, sites, keep_raw=cfg.intensity != "none", listed=listed)
    pool = images["train"] if "val" not in images else concat(images["train"], images["val"])
    raw_pool = None
    if raw is not None:
        raw_pool = raw["train"] if "val" not in raw else concat(raw["train"], raw["val"])
        if raw_pool.names != pool.names:  # one cache file made from another: cannot happen
            raise UserError("the decoded-image cache is out of step: delete data.cache_dir")
    if cfg.split_from:
        train_idx, val_idx = split_as(pool, cfg.split_from)
    else:
        train_idx, val_idx = split_by_patient(pool, cfg.val_fraction, seed)
    source = "SYNTHETIC images (no data.root given)" if cfg.root is None else str(cfg.root)
    val = pool.subset(val_idx)
    raw_val = raw_pool.subset(val_idx) if raw_pool is not None else None
    unstandardised = raw_val if raw_val is not None else val
    val_shift = shifted(unstandardised, cfg.shift, cfg.intensity) if cfg.shift.enabled else None
    train = pool.subset(train_idx)
    raw_train = raw_pool.subset(train_idx) if raw_pool is not None else None
    if cfg.train_fraction < 1.0:
        kept, _ = split_by_patient(train, 1.0 - cfg.train_fraction, seed + 1)
        train = train.subset(kept)
        raw_train = raw_train.subset(kept) if raw_train is not None else None
    files = files_identity(cfg.root, listed) if cfg.root is not None else None
    return Splits(
        train,
        val,
        images.get("test"),
        source,
        val_shift,
        raw_train=raw_train,
        raw_val=raw_val,
        files=files,
    )


def files_identity(root: str | Path, relative_paths: list[str]) -> str:
    """`root`'s folder name and the first 12 hex digits of the SHA-256 of its files' paths
    relative to it, sorted, one per line: the same for the same files on any machine."""
    text = "\n".join(sorted(relative_paths)) + "\n"
    digest = hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return f"{Path(root).resolve().name} (file list sha256 {digest})"


def split_as(pool: ImageSet, split_csv: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val) of `pool` with the validation patients of a run's split.csv."""
    path = Path(split_csv)
    if not path.is_file():
        raise UserError(f"data.split_from {path} does not exist: give a run's split.csv")
    try:
        with open(path, newline="") as f:
            val = {row["patient"] for row in csv.DictReader(f) if row["split"] == "val"}
    except (KeyError, csv.Error, UnicodeDecodeError):
        raise UserError(
            f"data.split_from {path} is not a run's split.csv (split, class, patient, name)"
        ) from None
    in_val = [p in val for p in pool.patients]
    if not any(in_val) or all(in_val):
        raise UserError(
            f"data.split_from {path}: its validation patients are not a part of these images: "
            "was it written for this data.root?"
        )
    index = torch.arange(len(pool))
    mask = torch.tensor(in_val)
    return index[~mask], index[mask]


def full_samples(cfg: DataConfig, seed: int, count: int = 8) -> list[torch.Tensor]:
    """`count` seeded, randomly chosen training radiographs as decoded, before any crop or
    resize ([1, H, W] each): for showing what the lung-field segmentation does to them."""
    g = torch.Generator().manual_seed(seed)
    if cfg.root is None:
        s = cfg.synthetic
        images = generate_synthetic(s.n_patients, cfg.image_size, seed, s.pneumonia_fraction)
        pick = torch.randperm(len(images), generator=g)[:count].tolist()
        return [images.images[i] for i in pick]
    try:
        folders = [find_splits(cfg.root)["train"]]
    except UserError:  # a root of hospital folders (partition sites)
        folders = [find_splits(site)["train"] for site in find_sites(cfg.root).values()]
    files = [f for folder in folders for f in list_image_files(folder)]
    pick = torch.randperm(len(files), generator=g).tolist()
    out = []
    for i in pick:  # an unreadable file is skipped: the panel is for looking, not training
        with contextlib.suppress(CorruptImageError):
            out.append(read_image(files[i].path))
        if len(out) == count:
            break
    return out


def crop_all(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Decoded images [N, 1, S, S] cropped to their lung fields (the synthetic images: made
    at their final size, so the crop is resized back up)."""
    return torch.stack([prepare(image, image_size, "lungs")[0] for image in images])


def concat(a: ImageSet, b: ImageSet) -> ImageSet:
    """Two ImageSets of one size, one after the other."""
    return ImageSet(
        torch.cat([a.images, b.images]),
        torch.cat([a.labels, b.labels]),
        a.patients + b.patients,
        a.names + b.names,
        a.classes,
    )
