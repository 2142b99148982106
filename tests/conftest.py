"""Shared fixtures: a private cache directory for every test, and tiny Kermany-style folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pneumonia.core.startup import startup

# The tests call the commands' functions in-process, as the commands run: with the process-wide
# settings (denormals, quiet warnings, the console that prints the package's log lines).
startup()

# (format, mode, (width, height)) cycled over the images of a folder: every variant a loader meets.
IMAGE_VARIANTS = (
    ("JPEG", "L", (50, 37)),
    ("JPEG", "RGB", (224, 224)),
    ("PNG", "L", (300, 180)),
    ("JPEG", "L", (64, 64)),
    ("PNG", "RGB", (37, 50)),
)
NORMAL_MEAN, PNEUMONIA_MEAN = 50, 180  # NORMAL images dark, PNEUMONIA bright


def write_image(
    path: Path,
    mean: float,
    size: tuple[int, int],
    mode: str = "L",
    fmt: str = "JPEG",
    seed: int = 0,
) -> Path:
    """A noisy grey image of about `mean` brightness; RGB images have three equal channels."""
    rng = np.random.default_rng(seed)
    width, height = size
    pixels = np.clip(rng.normal(mean, 15, (height, width)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "L")
    if mode == "RGB":
        image = image.convert("RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt)
    return path


def _normal_name(patient: int, k: int, image: int) -> str:
    if k % 3 == 0:
        return f"IM-{patient:04d}-{image:04d}"  # IM-0115-0001
    if k % 3 == 1:
        return f"IM-{patient:04d}-0001-{image:04d}"  # IM-0629-0001-0003
    return f"NORMAL2-IM-{patient:04d}-{image:04d}"  # NORMAL2-IM-1427-0001


def _pneumonia_name(patient: int, k: int, image: int) -> str:
    kind = "bacteria" if k % 2 == 0 else "virus"
    odd = "_1" if k % 4 == 3 and image == 1 else ""  # person447_virus_921_1
    return f"person{patient}_{kind}_{100 * patient + image}{odd}"


def write_kermany_folder(
    root: Path,
    n_normal_patients: int = 6,
    n_pneumonia_patients: int = 8,
    size: tuple[int, int] | None = None,
    first_patient: int = 100,
) -> Path:
    """Write root/NORMAL and root/PNEUMONIA with 1-3 images per patient (1, 2, 3, 1, 2, 3, ...)
    named as in the real data, in a mix of grey/RGB JPEG and PNG of odd sizes (all `size`, as
    (width, height), when given). Patient numbers start at `first_patient`, so calls for
    train/ and test/ with different starts give disjoint patients. Returns `root`."""
    root = Path(root)
    count = 0
    for cls, n_patients, mean, name_of in (
        ("NORMAL", n_normal_patients, NORMAL_MEAN, _normal_name),
        ("PNEUMONIA", n_pneumonia_patients, PNEUMONIA_MEAN, _pneumonia_name),
    ):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for k in range(n_patients):
            for image in range(1, k % 3 + 2):
                fmt, mode, shape = IMAGE_VARIANTS[count % len(IMAGE_VARIANTS)]
                suffix = ".png" if fmt == "PNG" else ".jpeg"
                path = root / cls / (name_of(first_patient + k, k, image) + suffix)
                write_image(path, mean, size or shape, mode, fmt, seed=count)
                count += 1
    return root


def folder_listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under `root` with its size and mtime: to check nothing was written there."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


# How `make test` (three one-thread workers on two cores, `--dist loadfile`) keeps both cores
# busy. The Flower tests mostly wait (process start-ups, heartbeats: about 500 s of waiting and
# 160 core-seconds of work, measured), the rest mostly computes (about 850 core-seconds). Two
# Flower files on two workers at once left one core idle for minutes, so every Flower file is
# one unit of work, run one after another on one worker (FlowerTogether below) while the other
# two compute. Units start in collection order (--no-loadscope-reorder: xdist's own order, most
# tests first, started the Flower files last): the Flower unit first, then the files that
# compute longest (core-seconds in a fresh-clone run), then the rest.
LONGEST_FIRST = [
    "flower/test_federation.py",
    "flower/test_secure.py",
    "flower/test_demo.py",
    "flower/test_tls.py",
    "flower/test_simulation.py",
    "compare/test_compare.py",  # 133
    "test_faults.py",  # 111
    "test_gpu_configs.py",  # 56
    "test_ddp.py",  # 50
    "test_privacy.py",  # 90
    "test_options.py",  # 82
    "test_bench.py",  # 72
    "federated/test_federated_fit.py",  # 55
    "test_learning.py",  # 44
]
FLOWER = "tests/flower/"


def pytest_collection_modifyitems(items) -> None:
    tests = Path(__file__).parent

    def rank(item) -> int:
        name = Path(item.fspath).relative_to(tests).as_posix()
        if name in LONGEST_FIRST:
            return LONGEST_FIRST.index(name)
        return 0 if name.startswith("flower/") else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: every file keeps its own order


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile`, with tests/flower/ as one unit (see LONGEST_FIRST)."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class FlowerTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return FLOWER if nodeid.startswith(FLOWER) else super()._split_scope(nodeid)

    return FlowerTogether(config, log)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch) -> Path:
    """No test writes to ~/.cache: the decoded-image cache goes to a fresh temporary dir."""
    cache = tmp_path_factory.mktemp("pneumonia-cache")
    monkeypatch.setenv("PNEUMONIA_CACHE", str(cache))
    return cache


@pytest.fixture(autouse=True)
def _torch_threads_unchanged():
    """A test that changes torch's thread count must put it back: `make test` runs one-thread
    workers on two cores, and a worker left at two threads ran its later tests 10-30x slower
    (the bench tests, before they restored it)."""
    import torch

    threads = torch.get_num_threads()
    yield
    now = torch.get_num_threads()
    torch.set_num_threads(threads)
    assert now == threads, f"the test left torch at {now} threads (was {threads})"


@pytest.fixture
def kermany_root(tmp_path) -> Path:
    """A flat Kermany-style folder: 12 NORMAL images of 6 patients, 15 PNEUMONIA of 8."""
    return write_kermany_folder(tmp_path / "chest_xray")


@pytest.fixture
def write_kermany():
    """`write_kermany_folder`, for tests that build their own (e.g. train/ test/) layouts."""
    return write_kermany_folder


TINY_MODEL = {"name": "se_resnet18", "norm": "gn", "gn_groups": 16, "se_reduction": 16,
              "width": 16, "drop_rate": 0.0, "pretrained": None}  # fmt: skip
TINY_CARD = {
    "trained_on": {"source": "SYNTHETIC images", "images": 50, "patients": 30,
                   "per_class": {"NORMAL": 17, "PNEUMONIA": 33}, "image_size": 32},
    "training": {"selected_by": "the end of a fixed schedule"},
    "threshold": 0.5, "threshold_rule": "0.5",
    "val": {"accuracy": 0.8, "auroc": 0.9, "ci95": {"accuracy": [0.7, 0.9]}, "n": 15},
    "val_shift": {"accuracy": 0.7, "auroc": 0.8, "ci95": {"auroc": [0.6, 0.9]}, "n": 15},
    "caveat": "A research tool, not a diagnostic device.",
}  # fmt: skip


def write_tiny_checkpoint(path: Path, seed: int = 0, threshold: float = 0.5) -> Path:
    """An untrained SE-ResNet-18 (width 16, 32 px) saved as a run's best.ckpt, model card and
    all: what predict, serve and export tests load."""
    import torch

    from pneumonia.training.checkpoint import finish_checkpoint, read_checkpoint, write_checkpoint
    from pneumonia.training.recipe import Recipe, build_module

    torch.manual_seed(seed)
    recipe = Recipe(model=TINY_MODEL, optim={}, image_size=32, mean=0.45, std=0.22)
    write_checkpoint(path, build_module(recipe).state_dict(), recipe, round_number=1)
    finish_checkpoint(path, read_checkpoint(path)[2], threshold, TINY_CARD)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """One `write_tiny_checkpoint` for the whole session (read-only: copy it to change it)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.ckpt")


def dicom_dataset(pixels, bits_stored: int | None = None, **elements):
    """A one-frame grey DX image of `pixels` (numpy uint8, uint16 or int16 [H, W]),
    uncompressed; extra elements by keyword (PhotometricInterpretation defaults to
    MONOCHROME2)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        DigitalXRayImageStorageForPresentation,
        ExplicitVRLittleEndian,
        generate_uid,
    )

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixels.tobytes()
    return ds


def write_dicom(path: Path, pixels, with_pixels: bool = True) -> Path:
    """`dicom_dataset` as a file; `with_pixels=False` leaves the pixel data out (what an
    ill-formed export looks like)."""
    ds = dicom_dataset(pixels)
    if not with_pixels:
        del ds.PixelData
    ds.save_as(path, enforce_file_format=True)
    return path


def draw_radiograph(side: int = 256):
    """A hand-drawn chest film: dark air, a bright body, two dark lungs; and the lungs' mask."""
    y, x = torch.meshgrid(torch.arange(side).float(), torch.arange(side).float(), indexing="ij")
    s = side / 256
    body = ((x - 128 * s) / (105 * s)) ** 2 + ((y - 140 * s) / (125 * s)) ** 2 <= 1
    lungs = torch.zeros(side, side, dtype=torch.bool)
    for cx in (83, 173):
        lungs |= ((x - cx * s) / (32 * s)) ** 2 + ((y - 120 * s) / (62 * s)) ** 2 <= 1
    image = torch.full((side, side), 12.0)
    image[body] = 205.0
    image[lungs] = 70.0
    image += 4 * torch.randn(side, side, generator=torch.Generator().manual_seed(0))
    return image.clamp(0, 255).round().to(torch.uint8)[None], lungs


@pytest.fixture
def radiograph():
    """(uint8 [1, 256, 256] film, bool [256, 256] mask of its two lungs)."""
    return draw_radiograph()


def run_predict(capsys, *argv: str) -> tuple[int, str, str]:
    """`python -m pneumonia.predict ARGV` in this process: (exit code, stdout, stderr)."""
    from pneumonia import predict

    try:
        predict.main(list(argv))
        code = 0
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err
