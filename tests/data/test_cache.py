import hashlib
import io
import os
import random
import re
import warnings
from pathlib import Path

import pytest
import torch

import pneumonia.data.cache as cache
from pneumonia.core.caches import default_cache_dir
from pneumonia.core.errors import UserError
from pneumonia.data.cache import load_or_decode
from pneumonia.data.kermany import list_image_files
from pneumonia.data.sources import DataConfig, load_images

S = 32


def folder_listing(root):
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


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


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "cache"


def cache_files(cache_dir):
    return sorted(cache_dir.glob("*.pt"))


def test_second_load_comes_from_cache(kermany_root, cache_dir, decodes):
    files = list_image_files(kermany_root)
    first = load_or_decode(files, S, cache_dir)
    assert len(decodes) == 1
    second = load_or_decode(files, S, cache_dir)
    assert len(decodes) == 1
    assert torch.equal(first.images, second.images)
    assert torch.equal(first.labels, second.labels)
    assert (first.patients, first.names) == (second.patients, second.names)
    assert second.images.shape == (27, 1, S, S) and second.images.dtype == torch.uint8


def test_cache_file_lives_in_cache_dir_and_data_folder_is_untouched(kermany_root, cache_dir):
    before = folder_listing(kermany_root)
    load_or_decode(list_image_files(kermany_root), S, cache_dir)
    assert [p.name for p in cache_files(cache_dir)][0].startswith(f"images-{S}px-")
    assert len(cache_files(cache_dir)) == 1
    assert folder_listing(kermany_root) == before


def test_default_cache_dir_follows_env(tmp_path, monkeypatch, kermany_root):
    monkeypatch.setenv("PNEUMONIA_CACHE", str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere"
    load_images(DataConfig(root=str(kermany_root), image_size=S), seed=0)
    assert len(cache_files(tmp_path / "elsewhere")) == 1


def test_touched_file_gives_new_cache_and_decode(kermany_root, cache_dir, decodes):
    load_or_decode(list_image_files(kermany_root), S, cache_dir)
    target = next((kermany_root / "NORMAL").iterdir())
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    load_or_decode(list_image_files(kermany_root), S, cache_dir)
    assert len(decodes) == 2
    assert len(cache_files(cache_dir)) == 2


def test_changed_content_gives_new_images(kermany_root, cache_dir, decodes):
    files = list_image_files(kermany_root)
    first = load_or_decode(files, S, cache_dir)
    target = files[0].path  # a dark NORMAL image; replace it by a bright one
    (kermany_root / "PNEUMONIA" / "person100_bacteria_10001.png").replace(target)
    files = list_image_files(kermany_root)
    second = load_or_decode(files, S, cache_dir)
    assert len(decodes) == 2
    assert second.images[0].float().mean() > first.images[0].float().mean() + 80


def test_other_image_size_gives_new_cache_and_decode(kermany_root, cache_dir, decodes):
    files = list_image_files(kermany_root)
    load_or_decode(files, S, cache_dir)
    other = load_or_decode(files, 16, cache_dir)
    assert len(decodes) == 2
    assert other.images.shape[-2:] == (16, 16)
    assert len(cache_files(cache_dir)) == 2


def _damaged(data: bytes, damage: str) -> bytes:
    if damage.startswith("garbage"):
        # Fixed seeds: unpickling seed 0's bytes raises UnpicklingError, seed 2's an
        # IndexError, seed 20's a KeyError (torch 2.x's weights-only unpickler).
        return random.Random(int(damage.split("-")[1])).randbytes(4096)
    if damage == "foreign":
        buffer = io.BytesIO()
        torch.save([1, 2, 3], buffer)  # a readable torch file that is not our payload
        return buffer.getvalue()
    return {"truncated": data[: len(data) // 2], "empty": b""}[damage]


@pytest.mark.parametrize(
    "damage", ["garbage-0", "garbage-2", "garbage-20", "truncated", "empty", "foreign"]
)
def test_corrupt_cache_file_is_ignored_with_warning_and_rebuilt(
    kermany_root, cache_dir, decodes, damage
):
    files = list_image_files(kermany_root)
    first = load_or_decode(files, S, cache_dir)
    (path,) = cache_files(cache_dir)
    data = path.read_bytes()
    path.write_bytes(_damaged(data, damage))
    with pytest.warns(UserWarning, match="ignoring unreadable cache file"):
        rebuilt = load_or_decode(files, S, cache_dir)
    assert len(decodes) == 2
    assert torch.equal(rebuilt.images, first.images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_or_decode(files, S, cache_dir)  # the rebuilt file reads cleanly
    assert len(decodes) == 2


@pytest.fixture
def corrupt_image(kermany_root):
    path = kermany_root / "NORMAL" / "IM-0999-0001.jpeg"
    path.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    return path


def test_skipped_count_is_warned_again_on_cached_load(
    kermany_root, cache_dir, decodes, corrupt_image
):
    files = list_image_files(kermany_root)
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable file\(s\), e\.g\. .*IM-0999"):
        first = load_or_decode(files, S, cache_dir, skip_corrupt=True)
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable file\(s\)"):
        second = load_or_decode(files, S, cache_dir, skip_corrupt=True)
    assert len(decodes) == 1
    assert len(first) == len(second) == 27
    assert "IM-0999-0001.jpeg" not in second.names


def test_cached_skip_without_skip_corrupt_raises_naming_file(
    kermany_root, cache_dir, corrupt_image
):
    files = list_image_files(kermany_root)
    with pytest.warns(UserWarning, match="skipped 1"):
        load_or_decode(files, S, cache_dir, skip_corrupt=True)
    with pytest.raises(UserError, match=re.escape(str(corrupt_image))):
        load_or_decode(files, S, cache_dir)


def test_corrupt_image_without_skip_raises_and_writes_no_cache(
    kermany_root, cache_dir, corrupt_image
):
    with pytest.raises(UserError, match=re.escape(str(corrupt_image))):
        load_or_decode(list_image_files(kermany_root), S, cache_dir)
    assert cache_files(cache_dir) == []


def old_key(files, image_size: int) -> str:
    """The key as it was computed from the names' text: what earlier cache files are named by."""
    digest = hashlib.sha256(f"v{cache.CACHE_VERSION}|{image_size}".encode())
    for f in files:
        stat = f.path.stat()
        path = os.path.join(os.path.realpath(f.path.parent), f.path.name)
        digest.update(f"|{path}|{stat.st_size}|{stat.st_mtime_ns}|{f.label}".encode())
    return digest.hexdigest()[:24]


def test_a_file_name_that_is_not_utf8_is_decoded_and_cached_like_any_other(
    kermany_root, cache_dir, decodes
):
    assert cache.cache_key(list_image_files(kermany_root), S) == old_key(
        list_image_files(kermany_root), S
    )  # keyed by the names' bytes, the caches of UTF-8 names stay valid
    # Linux names are bytes: 0xff is no UTF-8, so Python holds it as the surrogate \udcff.
    odd = Path(os.fsdecode(bytes(kermany_root / "NORMAL") + b"/IM-0998-\xff.png"))
    odd.write_bytes((kermany_root / "PNEUMONIA" / "person100_bacteria_10001.png").read_bytes())
    files = list_image_files(kermany_root)
    first = load_or_decode(files, S, cache_dir)
    second = load_or_decode(files, S, cache_dir)
    assert len(decodes) == 1 and len(first) == 28
    assert odd.name in second.names and torch.equal(first.images, second.images)
