"""data.intensity: each image's grey levels standardised (none, equalize, clahe) after the
resize, cached per option, and after any simulated re-imaging (the shift validation)."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from skimage import exposure

import pneumonia.data.cache as cache
from pneumonia.data.cache import cache_path, load_or_decode
from pneumonia.data.decode import decode_files, prepare, square
from pneumonia.data.intensity import standardize
from pneumonia.data.kermany import list_image_files
from pneumonia.data.shifts import ShiftConfig, shifted
from pneumonia.data.sources import DataConfig, SyntheticConfig, load_splits

S = 32


def smooth(side: int = S, n: int = 1, seed: int = 0) -> torch.Tensor:
    """uint8 [n, 1, side, side]: a dim gradient with noise, every grey level below 160."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(20, 120, side).expand(side, side)
    noise = torch.rand(n, 1, side, side, generator=g) * 30
    return (ramp + noise).round().to(torch.uint8)


# -- the function ---------------------------------------------------------------------------


def test_equalize_is_the_cdf_of_the_grey_levels():
    image = torch.tensor([[0, 0, 1, 2], [2, 2, 3, 5], [5, 5, 5, 7], [7, 9, 9, 9]],
                         dtype=torch.uint8)[None]  # fmt: skip
    # Pixels at or below each level, of 16: 0: 2, 1: 3, 2: 6, 3: 7, 5: 11, 7: 13, 9: 16;
    # round(255 x count / 16).
    expected = {0: 32, 1: 48, 2: 96, 3: 112, 5: 175, 7: 207, 9: 255}
    out = standardize(image, "equalize")
    assert out.dtype == torch.uint8 and out.shape == (1, 4, 4)
    assert out[0].tolist() == [[expected[v] for v in row] for row in image[0].tolist()]


def test_clahe_is_scikit_images_on_the_float_image():
    image = smooth()
    reference = exposure.equalize_adapthist(
        image[0, 0].numpy() / 255.0, kernel_size=S // 8, clip_limit=0.01
    )
    expected = torch.from_numpy(np.round(reference * 255.0).astype(np.uint8))
    out = standardize(image, "clahe")
    assert out.dtype == torch.uint8 and out.shape == image.shape
    assert torch.equal(out[0, 0], expected)
    assert not torch.equal(out, image) and not torch.equal(out, standardize(image, "equalize"))


@pytest.mark.parametrize("mode", ["equalize", "clahe"])
def test_a_batch_is_each_image_standardised_alone(mode):
    batch = smooth(n=3)
    out = standardize(batch, mode)
    assert out.dtype == torch.uint8 and out.shape == (3, 1, S, S)
    for i in range(3):
        assert torch.equal(out[i], standardize(batch[i], mode))
    assert int(out.max()) == 255  # the dim images now reach white


def test_none_is_the_identity_and_a_flat_image_stays_as_it_is():
    image = smooth()
    assert standardize(image, "none") is image
    flat = torch.full((1, 8, 8), 100, dtype=torch.uint8)
    assert torch.equal(standardize(flat, "equalize"), flat)
    with pytest.raises(ValueError, match="unknown intensity"):
        standardize(image, "sharpen")


def test_prepare_squashes_then_standardises():
    g = torch.Generator().manual_seed(1)
    image = (torch.rand(1, 96, 64, generator=g) * 120).to(torch.uint8)
    seen, found = prepare(image, S, "full", "clahe")
    assert found and torch.equal(seen, standardize(square(image, S), "clahe"))
    assert torch.equal(prepare(image, S)[0], square(image, S))  # none: as before


# -- the cache ------------------------------------------------------------------------------


@pytest.fixture
def decodes(monkeypatch):
    """Counts the calls to decode_files made by the cache."""
    calls = []
    real = cache.decode_files

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(cache, "decode_files", counting)
    return calls


def test_none_keeps_the_cache_file_of_earlier_releases(kermany_root, tmp_path):
    files = list_image_files(kermany_root)
    plain = cache_path(files, S, tmp_path)
    assert cache_path(files, S, tmp_path, "full", "none") == plain
    assert plain.name.startswith(f"images-{S}px-") and plain.name.count("-") == 2
    clahe = cache_path(files, S, tmp_path, "full", "clahe")
    assert clahe.name.startswith(f"images-{S}px-clahe-") and clahe != plain
    assert clahe != cache_path(files, S, tmp_path, "full", "equalize")


def test_each_option_has_its_own_file_and_decodes_once(kermany_root, tmp_path, decodes):
    files, cache_dir = list_image_files(kermany_root), tmp_path / "cache"
    clahe = load_or_decode(files, S, cache_dir, intensity="clahe")
    assert len(decodes) == 1  # the un-standardised images, then standardised
    assert len(list(cache_dir.glob("*.pt"))) == 2
    again = load_or_decode(files, S, cache_dir, intensity="clahe")
    plain = load_or_decode(files, S, cache_dir)
    equalized = load_or_decode(files, S, cache_dir, intensity="equalize")
    assert len(decodes) == 1 and len(list(cache_dir.glob("*.pt"))) == 3
    assert torch.equal(again.images, clahe.images)
    assert torch.equal(clahe.images, standardize(plain.images, "clahe"))
    assert torch.equal(equalized.images, standardize(plain.images, "equalize"))
    assert not torch.equal(clahe.images, plain.images)
    # What prepare makes of each file, decoded directly.
    direct, _, _ = decode_files(files, S, intensity="clahe")
    assert torch.equal(direct.images, clahe.images) and direct.names == clahe.names


# -- splits ---------------------------------------------------------------------------------


def test_splits_are_standardised_and_the_shift_validation_reimages_first():
    synthetic = SyntheticConfig(n_patients=30)
    plain = load_splits(DataConfig(image_size=S, synthetic=synthetic), seed=0)
    eq = load_splits(DataConfig(image_size=S, synthetic=synthetic, intensity="equalize"), 0)
    assert plain.raw_train is None and plain.raw_val is None
    assert eq.train.names == plain.train.names and eq.val.names == plain.val.names
    assert torch.equal(eq.train.images, standardize(plain.train.images, "equalize"))
    assert torch.equal(eq.val.images, standardize(plain.val.images, "equalize"))
    assert torch.equal(eq.raw_train.images, plain.train.images)
    assert torch.equal(eq.raw_val.images, plain.val.images)
    # Another scanner's image, then standardised: not a standardised image shifted.
    assert torch.equal(eq.val_shift.images, standardize(plain.val_shift.images, "equalize"))
    assert eq.val_shift.names == plain.val_shift.names
    assert not torch.equal(eq.val_shift.images, shifted(eq.val, ShiftConfig()).images)


def test_a_folders_splits_come_from_the_cache_and_keep_their_raw_images(
    kermany_root, tmp_path, decodes
):
    cfg = DataConfig(root=str(kermany_root), image_size=S, cache_dir=str(tmp_path / "c"),
                     train_fraction=0.7)  # fmt: skip
    plain = load_splits(cfg, seed=0)
    clahe = load_splits(replace(cfg, intensity="clahe"), seed=0)
    assert len(decodes) == 1
    assert clahe.train.names == plain.train.names == clahe.raw_train.names
    assert torch.equal(clahe.train.images, standardize(plain.train.images, "clahe"))
    assert torch.equal(clahe.raw_train.images, plain.train.images)
    assert torch.equal(clahe.val_shift.images, standardize(plain.val_shift.images, "clahe"))
