"""The classical lung-field segmentation, its crops, its cache and the CAM-energy share."""

import torch
from PIL import Image

from pneumonia.data.cache import load_or_decode
from pneumonia.data.decode import prepare
from pneumonia.data.kermany import list_image_files
from pneumonia.data.lungs import (
    WORK_SIDE,
    crop_to_lungs,
    energy_inside,
    lung_box,
    lung_field,
    mask_at,
)


def test_the_two_lungs_of_a_drawn_radiograph_are_found(radiograph):
    image, truth = radiograph
    field = lung_field(image)
    assert field.plausible, field.reason
    truth_small = mask_at(WORK_SIDE, type(field)(truth.numpy(), True))
    found = torch.from_numpy(field.mask)
    iou = (found & truth_small).sum() / (found | truth_small).sum()
    assert iou > 0.8
    left, right = found[:, : WORK_SIDE // 2].sum(), found[:, WORK_SIDE // 2 :].sum()
    assert left > 0.3 * found.sum() and right > 0.3 * found.sum()  # both lungs, not one


def test_the_crop_is_the_lungs_box_with_its_margin(radiograph):
    image, _ = radiograph
    crop, found = crop_to_lungs(image)
    assert found
    top, left, bottom, right = lung_box(lung_field(image).mask)
    # Lungs span x 51-205 and y 58-182 of 256; the box adds 5% of the side on each side.
    assert abs(left - (51 / 256 - 0.05)) < 0.03 and abs(right - (205 / 256 + 0.05)) < 0.03
    assert abs(top - (58 / 256 - 0.05)) < 0.03 and abs(bottom - (182 / 256 + 0.05)) < 0.03
    assert crop.shape[-2] < 256 and crop.shape[-1] < 256
    square, _ = prepare(image, 64, "lungs")
    assert square.shape == (1, 64, 64) and square.dtype == torch.uint8


def test_a_blank_image_falls_back_to_the_full_image(radiograph):
    blank = torch.full((1, 200, 180), 128, dtype=torch.uint8)
    field = lung_field(blank)
    assert not field.plausible and field.reason == "blank image"
    crop, found = crop_to_lungs(blank)
    assert not found and crop is blank
    body_only = radiograph[0].clone()
    body_only[body_only < 100] = 205  # a bright body with no lungs
    assert not lung_field(body_only).plausible


def test_the_energy_share_of_a_hand_made_map_and_mask():
    cam = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[True, False], [False, True]])
    assert energy_inside(cam, mask) == 0.5  # (1 + 4) / 10
    assert energy_inside(torch.tensor([[-5.0, 2.0], [0.0, 2.0]]), mask) == 0.5  # negatives: 0
    assert energy_inside(torch.zeros(2, 2), mask) != energy_inside(torch.zeros(2, 2), mask)


def test_lung_crops_have_their_own_cache_and_count_the_images_kept_whole(
    radiograph, tmp_path, capsys
):
    root = tmp_path / "data"
    (root / "NORMAL").mkdir(parents=True)
    (root / "PNEUMONIA").mkdir()
    film = radiograph[0][0].numpy()
    Image.fromarray(film).save(root / "NORMAL" / "IM-0001-0001.png")
    Image.fromarray(film * 0 + 128).save(root / "PNEUMONIA" / "person1_bacteria_1.png")  # blank
    files = list_image_files(root)
    full = load_or_decode(files, 32, tmp_path / "cache")
    lungs = load_or_decode(files, 32, tmp_path / "cache", roi="lungs")
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
    assert "lung field cropped in 1 of 2 images; 1 kept whole" in capsys.readouterr().out
    assert not torch.equal(full.images[0], lungs.images[0])  # the film was cropped
    assert torch.equal(full.images[1], lungs.images[1])  # the blank one kept whole
    again = load_or_decode(files, 32, tmp_path / "cache", roi="lungs")  # from the cache
    assert torch.equal(again.images, lungs.images)
    assert "1 kept whole" in capsys.readouterr().out
