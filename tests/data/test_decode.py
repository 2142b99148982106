import re

import numpy as np
import pytest
import torch
from PIL import Image

from pneumonia.core.errors import UserError
from pneumonia.data.decode import decode_file, decode_files
from pneumonia.data.kermany import ImageFile

S = 32


def gradient(width: int, height: int) -> np.ndarray:
    """A smooth grey image: diagonal ramp from 20 to 230."""
    x = np.linspace(0, 1, width)[None, :]
    y = np.linspace(0, 1, height)[:, None]
    return (20 + 210 * (x + y) / 2).astype(np.uint8)


def save(path, pixels: np.ndarray, mode: str = "L", fmt: str | None = None, **kw):
    image = Image.fromarray(pixels)
    if mode != image.mode:
        image = image.convert(mode)
    image.save(path, fmt, **kw)
    return path


@pytest.mark.parametrize(
    ("name", "mode", "size"),
    [
        ("grey.jpeg", "L", (224, 224)),
        ("rgb.jpeg", "RGB", (224, 224)),
        ("grey.png", "L", (300, 180)),
        ("rgb.png", "RGB", (50, 37)),
        ("rgba.png", "RGBA", (37, 50)),
        ("odd.jpeg", "L", (50, 37)),
        ("tiny.jpeg", "L", (7, 5)),
    ],
)
def test_any_format_and_size_decodes_to_uint8_square(tmp_path, name, mode, size):
    path = save(tmp_path / name, gradient(*size), mode)
    image = decode_file(path, S)
    assert image.shape == (1, S, S)
    assert image.dtype == torch.uint8
    # a 20..230 ramp stays a ramp: dark top-left, bright bottom-right
    assert image[0, 0, 0] < 80 and image[0, -1, -1] > 170


@pytest.mark.parametrize("ext", ["png", "jpeg"])
def test_rgb_with_equal_channels_decodes_like_grey(tmp_path, ext):
    pixels = gradient(60, 45)
    grey = decode_file(save(tmp_path / f"grey.{ext}", pixels, "L", quality=95), S)
    rgb = decode_file(save(tmp_path / f"rgb.{ext}", pixels, "RGB", quality=95), S)
    assert (grey.int() - rgb.int()).abs().max() <= 2


def test_16_bit_png_decodes_to_uint8_and_mixes_with_8_bit(tmp_path):
    pixels16 = gradient(40, 30).astype(np.uint16) * 257  # 8-bit value v -> 16-bit v * 257
    Image.fromarray(pixels16).save(tmp_path / "deep.png")
    save(tmp_path / "flat.png", gradient(40, 30))
    deep = decode_file(tmp_path / "deep.png", S)
    assert deep.dtype == torch.uint8
    assert (deep.int() - decode_file(tmp_path / "flat.png", S).int()).abs().max() <= 1
    files = [ImageFile(tmp_path / n, 0, n) for n in ("deep.png", "flat.png")]
    imageset, _, _ = decode_files(files, S)
    assert imageset.images.dtype == torch.uint8 and imageset.images.shape == (2, 1, S, S)


@pytest.fixture
def mixed_files(tmp_path):
    """Two good images, random bytes named .jpeg, and a text file named .jpeg."""
    save(tmp_path / "a.jpeg", gradient(40, 30))
    save(tmp_path / "b.png", 255 - gradient(30, 40), "RGB")
    (tmp_path / "corrupt.jpeg").write_bytes(np.random.default_rng(0).bytes(2000))
    (tmp_path / "notes.jpeg").write_text("not an image\n")
    return [
        ImageFile(tmp_path / "a.jpeg", 0, "pa"),
        ImageFile(tmp_path / "corrupt.jpeg", 1, "pc"),
        ImageFile(tmp_path / "b.png", 1, "pb"),
        ImageFile(tmp_path / "notes.jpeg", 0, "pn"),
    ]


@pytest.mark.parametrize("bad", ["corrupt.jpeg", "notes.jpeg"])
def test_unreadable_file_raises_user_error_naming_it(mixed_files, bad):
    files = [f for f in mixed_files if f.path.name in ("a.jpeg", bad)]
    with pytest.raises(UserError, match=re.escape(str(files[0].path.parent / bad))):
        decode_files(files, S)


def test_skip_corrupt_leaves_bad_files_out_and_lists_them(mixed_files):
    imageset, skipped, _ = decode_files(mixed_files, S, skip_corrupt=True)
    assert skipped == sorted(str(f.path) for f in mixed_files if f.patient in ("pc", "pn"))
    assert imageset.names == ["a.jpeg", "b.png"]
    assert imageset.patients == ["pa", "pb"]
    assert imageset.labels.tolist() == [0, 1]
    assert imageset.images.shape == (2, 1, S, S)


def test_skip_corrupt_with_no_readable_file_raises(mixed_files):
    bad = [f for f in mixed_files if f.patient in ("pc", "pn")]
    with pytest.raises(UserError, match="no readable image among 2 files"):
        decode_files(bad, S, skip_corrupt=True)


def test_decode_files_keeps_file_order(tmp_path):
    files = []
    for i in range(6):  # brightness 0, 40, ..., 200 tells the images apart
        save(tmp_path / f"{i}.png", np.full((20, 30), 40 * i, np.uint8))
        files.append(ImageFile(tmp_path / f"{i}.png", i % 2, f"p{i}"))
    imageset, skipped, _ = decode_files(files, S)
    assert skipped == []
    assert imageset.images.float().mean(dim=(1, 2, 3)).tolist() == [40.0 * i for i in range(6)]
    assert imageset.labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert imageset.names == [f"{i}.png" for i in range(6)]
