"""cxrexp.lungs.masks on hand-drawn masks with hand-checked boxes."""

from __future__ import annotations

import numpy as np
import pytest

from cxrexp.lungs import masks as lm


def two_lungs(h=20, w=20, left=(4, 16, 2, 8), right=(4, 16, 12, 18)) -> np.ndarray:
    """bool HxW with two rectangles (y0, y1, x0, x1) as lungs."""
    mask = np.zeros((h, w), bool)
    for y0, y1, x0, x1 in (left, right):
        mask[y0:y1, x0:x1] = True
    return mask


@pytest.mark.parametrize(
    "mask, expected",
    [
        (np.array([[0, 128], [255, 127]], np.uint8), [[False, True], [True, False]]),
        (np.array([[[0, 0, 0], [0, 200, 0]]], np.uint8), [[False, True]]),  # 3-channel: any channel lit
        (np.array([[0, 40000]], np.uint16), [[False, True]]),
        (np.array([[True, False]]), [[True, False]]),
    ],
)
def test_binarise(mask, expected):
    assert lm.binarise(mask).tolist() == expected


def test_mask_is_resized_to_the_image_and_thresholded_after():
    mask = np.zeros((4, 4), np.uint8)
    mask[:, 2:] = 255  # right half lit
    out = lm.mask_for_image(mask, (8, 6))
    assert out.shape == (8, 6) and out.dtype == bool
    assert out[:, :2].sum() == 0 and out[:, 4:].all()  # the halves stay halves; only {False, True}


def test_largest_components_keeps_two_and_orders_areas():
    mask = two_lungs()
    mask[0, 0] = True  # a speck
    kept, areas = lm.largest_components(mask)
    assert areas == [72, 72] and not kept[0, 0] and kept.sum() == 144


@pytest.mark.parametrize(
    "mask, plausible, reason_part",
    [
        (two_lungs(), True, ""),  # 144 / 400 = 0.36
        (np.zeros((20, 20), bool), False, "empty mask"),
        (two_lungs(left=(4, 6, 2, 4), right=(4, 6, 12, 14)), False, "lung area 0.02 outside"),
        (two_lungs(left=(0, 20, 0, 9), right=(0, 20, 11, 20)), False, "lung area 0.90 outside"),
        (two_lungs(left=(2, 18, 2, 9), right=(2, 4, 12, 14)), False, "one lung found"),
    ],
)
def test_check_mask(mask, plausible, reason_part):
    check = lm.check_mask(mask)
    assert check.plausible is plausible
    assert reason_part in check.reason


@pytest.mark.parametrize(
    "margin, expected",
    [
        (0.0, (4, 16, 2, 18)),  # the union of both lungs
        (0.1, (3, 17, 0, 20)),  # 12 rows * 0.1 = 1 each side; 16 cols * 0.1 = 2 each side, clipped at 0/20
        (1.0, (0, 20, 0, 20)),  # clipped to the image
    ],
)
def test_crop_box(margin, expected):
    assert lm.crop_box(two_lungs(), margin) == expected


def test_crop_box_of_an_empty_mask_raises():
    with pytest.raises(ValueError, match="empty"):
        lm.crop_box(np.zeros((4, 4), bool), 0.05)


def test_crop_pads_to_a_square_centred_or_stretches():
    image = np.arange(1, 41, dtype=np.uint8).reshape(4, 10)
    padded = lm.crop(image, (0, 4, 0, 10), "pad", fill=0)
    assert padded.shape == (10, 10)
    assert (padded[:3] == 0).all() and (padded[7:] == 0).all()  # 6 rows of padding split 3 / 3
    np.testing.assert_array_equal(padded[3:7], image)
    assert lm.crop(image, (1, 3, 2, 5), "stretch", fill=0).tolist() == image[1:3, 2:5].tolist()
    with pytest.raises(ValueError, match="aspect"):
        lm.crop(image, (0, 4, 0, 10), "squash", fill=0)


def test_lung_view_modes():
    image = np.full((20, 20), 200, np.uint8)
    mask = two_lungs()
    crop = lm.lung_view(image, mask, "crop", margin=0.0, fill=0, aspect="stretch")
    assert crop.applied and crop.box == (4, 16, 2, 18) and crop.image.shape == (12, 16)
    assert (crop.image == 200).all()  # crop keeps the space between the lungs
    masked = lm.lung_view(image, mask, "mask", margin=0.0, fill=7, aspect="stretch")
    assert masked.applied and (masked.image[:, 6:10] == 7).all()  # between the lungs: filled
    assert (masked.image[:, :6] == 200).all()
    whole = lm.lung_view(image, mask, "none", margin=0.05, fill=0, aspect="pad")
    assert not whole.applied and whole.image is image


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("margin", [0.0, 0.05, 0.2])
def test_lung_view_box_is_crop_box_of_the_two_largest_components(seed, margin):
    """lung_view takes its box from the component statistics (one labelling per mask); it must be the
    box crop_box finds on the two largest components' pixels, a third blob (text, a marker) left out."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((64, 48), bool)
    for _ in range(3):  # two lungs and a smaller third blob, at random places (they may touch)
        y0, x0 = rng.integers(0, 40), rng.integers(0, 30)
        mask[y0:y0 + rng.integers(8, 24), x0:x0 + rng.integers(4, 18)] = True
    mask[rng.integers(0, 60), rng.integers(0, 44)] = True  # a stray pixel
    kept, _ = lm.largest_components(mask)
    view = lm.lung_view(np.zeros(mask.shape, np.uint8), mask, "crop", margin=margin, fill=0, aspect="stretch",
                        min_area=0.0, max_area=1.0)
    if lm.check_mask(mask, min_area=0.0, max_area=1.0).plausible:
        assert view.applied and view.box == lm.crop_box(kept, margin)
        assert view.area == pytest.approx(kept.sum() / mask.size)
    else:
        assert not view.applied


def test_implausible_mask_falls_back_to_the_whole_image_with_the_reason():
    image = np.full((20, 20), 9, np.uint8)
    view = lm.lung_view(image, np.zeros((20, 20), bool), "crop", margin=0.05, fill=0, aspect="pad")
    assert not view.applied and view.reason == "empty mask" and view.image.shape == (20, 20)


def test_lung_view_refuses_a_mask_of_another_size():
    with pytest.raises(ValueError, match="mask_for_image"):
        lm.lung_view(np.zeros((8, 8), np.uint8), np.zeros((4, 4), bool), "crop", margin=0.0, fill=0, aspect="pad")


@pytest.mark.parametrize(
    "a, b, dice, iou",
    [
        ([[1, 1, 0, 0]], [[1, 1, 0, 0]], 1.0, 1.0),
        ([[1, 1, 0, 0]], [[0, 1, 1, 0]], 0.5, 1 / 3),
        ([[1, 0, 0, 0]], [[0, 0, 0, 1]], 0.0, 0.0),
        ([[0, 0]], [[0, 0]], 1.0, 1.0),  # nothing to find, nothing found
    ],
)
def test_dice_and_iou(a, b, dice, iou):
    a, b = np.array(a, bool), np.array(b, bool)
    assert lm.dice(a, b) == pytest.approx(dice) and lm.iou(a, b) == pytest.approx(iou)
