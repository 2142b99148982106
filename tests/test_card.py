"""The model card names the training data without the training machine's path: data.root's
folder name and a short hash of its sorted file list. Cards written before, with a path, still
load and show as they are."""

import hashlib
import os
import shutil

from fastapi.testclient import TestClient

from pneumonia.data.sources import DataConfig, load_splits
from pneumonia.inference.predictor import Predictor
from pneumonia.run.card import model_card
from pneumonia.serve.app import create_app
from pneumonia.training.checkpoint import finish_checkpoint, read_checkpoint

SUMMARY = {"selected_by": "the epoch whose weights had the best val/loss", "threshold": 0.5,
           "threshold_rule": "0.5"}  # fmt: skip
CONFIG = {"model": {"name": "resnet18"}, "data": {"image_size": 32}, "seed": 0}


def sorted_list_hash(root) -> str:
    paths = sorted(
        os.path.relpath(os.path.join(folder, name), root)
        for folder, _, names in os.walk(root)
        for name in names
        if not name.startswith(".")
    )
    return hashlib.sha256(("\n".join(paths) + "\n").encode()).hexdigest()[:12]


def card_source(root) -> str:
    splits = load_splits(DataConfig(root=str(root), image_size=32), seed=0)
    return model_card(SUMMARY, splits, CONFIG, "PNEUMONIA")["trained_on"]["source"]


def test_the_card_names_the_folder_and_its_file_list_not_the_path(kermany_root, tmp_path):
    source = card_source(kermany_root)
    assert source == f"chest_xray (file list sha256 {sorted_list_hash(kermany_root)})"
    assert str(tmp_path) not in source
    # The same files elsewhere: the same card; one file less: another hash.
    moved = shutil.copytree(kermany_root, tmp_path / "elsewhere" / "chest_xray")
    assert card_source(moved) == source
    next((moved / "NORMAL").iterdir()).unlink()
    assert card_source(moved) != source


def test_a_card_written_with_a_path_still_loads_and_shows(tiny_checkpoint, tmp_path):
    path = shutil.copy(tiny_checkpoint, tmp_path / "best.ckpt")
    _, _, ckpt = read_checkpoint(path)
    card = ckpt["model_card"] | {"trained_on": {"source": "/home/someone/data/chest_xray/train"}}
    finish_checkpoint(path, ckpt, 0.5, card)
    with TestClient(create_app(Predictor.from_checkpoint(path))) as client:
        shown = client.get("/model").json()["card"]["trained_on"]["source"]
    assert shown == "/home/someone/data/chest_xray/train"
