"""A trained model applied to new radiographs: the checkpoint's preprocessing, its threshold and
identity, one row per image. `pneumonia.predict` (files), `pneumonia.serve` (uploads) and
`pneumonia.inference.onnx_model` (the exported graph) all answer in these rows.

A row: path, probability (P(positive class)), decision (a class name: positive when the
probability is above the threshold, as every metric of the package counts it), threshold,
model, image_size, checkpoint (the first 16 hex digits of the checkpoint file's SHA-256).
A three-class model (NORMAL, BACTERIA, VIRUS) adds each class's probability after
`probability` (p_NORMAL, p_BACTERIA, p_VIRUS; probability is P(PNEUMONIA), the sum of the
last two) and `cause`, the likelier of BACTERIA and VIRUS when the decision is PNEUMONIA.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from pneumonia.core.errors import UserError
from pneumonia.core.files import write_bytes_atomic
from pneumonia.data.budget import not_regular
from pneumonia.data.decode import (
    CorruptImageError,
    crop_to_roi,
    image_format,
    read_image,
    read_regular,
    to_input,
)
from pneumonia.inference.explain import (
    cam_caption,
    cam_figure,
    explainable,
    figure_png,
    heatmaps,
)
from pneumonia.inference.scoring import predict_class_probabilities, predict_probabilities
from pneumonia.training.checkpoint import model_card, module_from, read_checkpoint
from pneumonia.training.module import ClassifierModule

# What a folder walk takes as an image. Files named on the command line are read whatever
# their name; in folders, files without a suffix are taken when they carry DICOM's mark.
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".gif", ".webp", ".dcm", ".dicom")
COLUMNS = ("path", "probability", "decision", "threshold", "model", "image_size", "checkpoint")


def file_sha256(path: str | Path) -> str:
    """The first 16 hex digits of a file's SHA-256: which checkpoint answered."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


@dataclass
class Model:
    """What every predictor knows of its model: preprocessing, threshold, identity, card."""

    image_size: int
    threshold: float
    classes: tuple[str, ...]
    positive_class: str
    name: str
    checkpoint: str  # file_sha256 of the checkpoint
    card: dict = field(default_factory=dict)
    roi: str = "full"  # data.roi of its training: lungs crops every image to its lung field
    intensity: str = "none"  # data.intensity of its training: how inputs are standardised

    @property
    def negative_class(self) -> str:
        return next(c for c in self.classes if c != self.positive_class)

    def row(self, path: str, probability: float, class_probs=None) -> dict:
        """The answer for one image (see the module docstring); `class_probs`: the softmax
        over a three-class model's classes."""
        positive = probability > self.threshold
        row = {"path": path, "probability": round(float(probability), 6)}
        if class_probs is not None:
            probs = dict(zip(self.classes, [float(p) for p in class_probs], strict=True))
            row |= {f"p_{c}": round(p, 6) for c, p in probs.items()}
        row |= {
            "decision": self.positive_class if positive else self.negative_class,
            "threshold": round(self.threshold, 6),
            "model": self.name,
            "image_size": self.image_size,
            "checkpoint": self.checkpoint,
        }
        if class_probs is not None:
            causes = {c: p for c, p in probs.items() if c != self.negative_class}
            row["cause"] = max(causes, key=lambda c: causes[c]) if positive else ""
        return row

    def describe(self) -> dict:
        """GET /model: identity, preprocessing, threshold and the model card."""
        return {
            "model": self.name,
            "checkpoint": self.checkpoint,
            "image_size": self.image_size,
            "classes": list(self.classes),
            "positive_class": self.positive_class,
            "threshold": self.threshold,
            "card": self.card,
        }


class Predictor:
    """A trained model ready to score images and explain its decisions.

    Build one with `pneumonia.load_checkpoint` (or `Predictor.from_checkpoint`). Images are
    uint8 tensors `[N, 1, S, S]` at the model's `model.image_size`, preprocessed as in
    training (`pneumonia.predict_files` reads and resizes files for you).

    Attributes:
        module: The LightningModule, in eval mode on `device`.
        model: What the model is: image size, threshold, classes, name, checkpoint hash, card.
        device: Where it runs.
    """

    def __init__(self, module: ClassifierModule, model: Model, device: str = "cpu") -> None:
        self.module = module.to(device).eval()
        self.model = model
        self.device = torch.device(device)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, threshold: float | None = None, device: str = "cpu"
    ) -> Predictor:
        """Load the model of a `pneumonia.fit` checkpoint.

        Args:
            path: The checkpoint file.
            threshold: The decision threshold; None: the one stored in the checkpoint.
            device: Where the model runs.

        Returns:
            The predictor.

        Raises:
            UserError: A missing file, or one that is not a checkpoint of this package.
        """
        recipe, state, ckpt = read_checkpoint(path)
        if threshold is not None:
            recipe = recipe.with_threshold(threshold)
        module = module_from(recipe, state, path)
        model = Model(
            image_size=recipe.image_size,
            threshold=float(recipe.threshold),
            classes=tuple(recipe.classes),
            positive_class=recipe.positive_class,
            name=recipe.model["name"],
            checkpoint=file_sha256(path),
            card=model_card(ckpt),
            roi=recipe.roi,
            intensity=recipe.intensity,
        )
        return cls(module, model, device)

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Score images in one batch (scoring's precision rules).

        Args:
            images: uint8 `[N, 1, S, S]`.

        Returns:
            P(positive class) of each image, `[N]`.
        """
        return predict_probabilities(self.module, images, max(len(images), 1), self.device)

    def scores(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(P(positive class) [N], the class probabilities [N, C] of a three-class model or
        None), in one batch."""
        if self.module.positive is not None:
            return self.probabilities(images), None
        batch = max(len(images), 1)
        class_probs = predict_class_probabilities(self.module, images, batch, self.device)
        return class_probs[:, self.module.positives].sum(1), class_probs

    @property
    def explains(self) -> bool:
        """Whether Grad-CAM can explain this model (an ensemble's members each have their own
        last stage: there is no one layer to read)."""
        return explainable(self.module.model)

    def heatmaps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Explain each decision with Grad-CAM (`pneumonia.inference.explain`).

        Args:
            images: uint8 `[N, 1, S, S]`.

        Returns:
            `(maps, probabilities)`: Grad-CAM maps `[N, S, S]` in [0, 1] and P(positive) `[N]`.
        """
        return heatmaps(self.module, images)


def find_inputs(inputs: Iterable[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """(image files, [(input, why it was skipped)]): files as given, folders walked recursively
    for image files (hidden ones left out), in sorted order within each folder. Only regular
    files are read: a named pipe or a device, given or met in a folder, is skipped unopened."""
    files: list[Path] = []
    skipped: list[tuple[str, str]] = []
    for item in inputs:
        path = Path(item)
        try:
            mode = path.stat().st_mode  # links followed: what would be read
        except OSError as err:
            missing = isinstance(err, FileNotFoundError | NotADirectoryError)
            why = "no such file or folder" if missing else err.strerror or type(err).__name__
            skipped.append((str(item), why))
            continue
        if stat.S_ISDIR(mode):
            found, passed = _images_under(path)
            files += found
            skipped += passed
        elif reason := not_regular(mode):
            skipped.append((str(item), reason))
        else:
            files.append(path)
    return files, skipped


def _images_under(folder: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """(the image files under `folder`, [(file, why it was skipped)]): files with an image
    suffix, and files without a suffix that carry DICOM's mark; of those, any that is not a
    regular file is skipped with the reason, never opened (a named pipe would block)."""
    found, skipped = [], []
    for parent, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            path = Path(parent) / name
            if name.startswith(".") or (path.suffix and path.suffix.lower() not in IMAGE_SUFFIXES):
                continue
            try:
                reason = not_regular(path.stat().st_mode)
            except OSError as err:  # a link that leads nowhere: named when named as an image
                if path.suffix:
                    skipped.append((str(path), err.strerror or type(err).__name__))
                continue
            if reason:
                skipped.append((str(path), reason))
            elif path.suffix or _has_dicom_mark(path):
                found.append(path)
    return found, skipped


def _has_dicom_mark(path: Path) -> bool:
    try:
        return image_format(read_regular(path, head=132)) == "dicom"
    except CorruptImageError:
        return False


@dataclass
class Decoded:
    """One input file: the model's view of it (or why there is none), and with `keep_full`
    the radiograph at its own size for overlays."""

    path: Path
    image: torch.Tensor | None = None
    full: torch.Tensor | None = None
    error: str = ""


def stacked_images(decoded: list[Decoded]) -> torch.Tensor:
    """The model's views [B, 1, S, S] of files that all decoded."""
    return torch.stack([d.image for d in decoded if d.image is not None])


# Overlays keep the radiograph's own aspect ratio, at most this many pixels a side.
OVERLAY_SIDE = 1024


def decode_one(
    path: Path, image_size: int, keep_full: bool = False, roi="full", intensity="none"
) -> Decoded:
    """Decode a file for the model (its lung field with `roi` lungs: the preview shows what
    the model saw; standardised by `intensity`, the preview is not); a file that cannot be
    read carries its reason instead."""
    try:
        full = crop_to_roi(read_image(path), roi)[0]
    except CorruptImageError as err:
        return Decoded(path, error=reason_of(err))
    image = to_input(full, image_size, intensity)
    return Decoded(path, image, preview(full) if keep_full else None)


def reason_of(err: CorruptImageError) -> str:
    """Why a file could not be read, in a few words."""
    return err.args[1] if len(err.args) > 1 and err.args[1] else "not a readable image"


def preview(full: torch.Tensor) -> torch.Tensor:
    """The radiograph at its own aspect ratio, at most OVERLAY_SIDE pixels a side: what
    overlays and the web page show."""
    scale = min(1.0, OVERLAY_SIDE / max(full.shape[-2:]))
    if scale == 1.0:
        return full
    side = [max(1, round(s * scale)) for s in full.shape[-2:]]
    return TF.resize(full, side, antialias=True)


def decoded_batches(
    files: list[Path],
    image_size: int,
    batch_size: int,
    keep_full: bool = False,
    roi="full",
    intensity="none",
) -> Iterator[list[Decoded]]:
    """The files decoded by a pool of threads (the decoders release the GIL), `batch_size` at a
    time and in order; the next batch decodes while the caller scores this one."""
    chunks = [files[i : i + batch_size] for i in range(0, len(files), batch_size)]
    with ThreadPoolExecutor(max_workers=max(torch.get_num_threads(), 1)) as pool:

        def submit(chunk: list[Path]) -> list:
            return [
                pool.submit(decode_one, p, image_size, keep_full, roi, intensity) for p in chunk
            ]

        pending = submit(chunks[0]) if chunks else []
        for following in [*chunks[1:], []]:
            ahead = submit(following)
            yield [future.result() for future in pending]
            pending = ahead


def predict_files(
    predictor,
    files: list[Path],
    batch_size: int = 64,
    progress: bool | None = None,
    on_batch=None,
) -> tuple[list[dict], list[tuple[str, str]]]:
    """(one row per readable file, [(file, why it was skipped)]). `predictor` is a
    `Predictor` or an `OnnxPredictor`; `on_batch(decoded, rows)` sees each batch with its
    rows (the heatmap writer). `progress`: None shows a bar when stderr is a terminal."""
    if not files:
        raise UserError("no image files among the inputs: give files or folders of images")
    model = predictor.model
    rows: list[dict] = []
    skipped: list[tuple[str, str]] = []
    keep_full = on_batch is not None
    bar = tqdm(
        total=len(files),
        desc="predict",
        unit="img",
        disable=None if progress is None else not progress,
    )
    with bar:
        batches = decoded_batches(
            files, model.image_size, batch_size, keep_full, model.roi, model.intensity
        )
        for batch in batches:
            good = [d for d in batch if d.image is not None]
            skipped += [(str(d.path), d.error) for d in batch if d.image is None]
            if good:
                probs, class_probs = predictor.scores(stacked_images(good))
                per_class = class_probs if class_probs is not None else [None] * len(good)
                rows += [
                    model.row(str(d.path), float(p), c)
                    for d, p, c in zip(good, probs, per_class, strict=True)
                ]
                if on_batch is not None:
                    on_batch(good, rows[-len(good) :])
            bar.update(len(batch))
    return rows, skipped


class HeatmapWriter:
    """`predict --cam DIR`: one overlay PNG per image (`explain.cam_figure`: titled with the
    file's name and decision, a colour bar beside it), named after the file (made unique when
    two inputs share a name); each row gets its overlay's path as "heatmap"."""

    def __init__(self, predictor: Predictor, folder: str | Path) -> None:
        self.predictor = predictor
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.written: dict[str, str] = {}  # input path -> overlay path
        self._taken: set[str] = set()

    def __call__(self, decoded: list[Decoded], rows: list[dict]) -> None:
        maps, _ = self.predictor.heatmaps(stacked_images(decoded))
        positive = self.predictor.model.positive_class
        for item, heat, row in zip(decoded, maps, rows, strict=True):
            assert item.full is not None  # predict_files keeps it for an on_batch (this writer)
            target = self.folder / self._unique(item.path.stem)
            caption, explained = cam_caption(row, positive)
            figure = cam_figure(item.full, heat, f"{item.path.name}\n{caption}", explained)
            write_bytes_atomic(target, figure_png(figure))
            self.written[str(item.path)] = str(target)

    def _unique(self, stem: str) -> str:
        name, n = f"{stem}.png", 1
        while name in self._taken:
            n += 1
            name = f"{stem}-{n}.png"
        self._taken.add(name)
        return name
