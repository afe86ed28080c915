"""cxrexp.audit: image-setting comparison, seeded sampling per confusion cell, the shortcut audit.

Table-driven on tiny arrays with hand-computed expectations; only ``lung_masks`` reads the session's
small prepared synthetic set (for its stored masks). The audit's verdicts on trained models are in
tests/test_audit_verdicts.py, the step that logs them in tests/test_evaluate_step.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from cxrexp.config import ImageSpec
from cxrexp.evaluation import audit, gradcam

# --------------------------------------------------------------------------------------------------
# Does the data fit the model?


@pytest.mark.parametrize(
    "model_spec, data_spec, expected",
    [
        (ImageSpec(48), ImageSpec(48), []),
        (ImageSpec(48), ImageSpec(64), ["image_size: model 48, data 64"]),
        (ImageSpec(48, "clahe"), ImageSpec(48, "gamma"), ["enhance: model 'clahe', data 'gamma'"]),
        (ImageSpec(48, clip_limit=2.0), ImageSpec(48, clip_limit=40.0), ["clip_limit: model 2.0, data 40.0"]),
        (ImageSpec(48, tile_grid=8), ImageSpec(48, tile_grid=4), ["tile_grid: model 8, data 4"]),
        # gamma cannot change a CLAHE image, nor CLAHE settings a gamma image
        (ImageSpec(48, "clahe", gamma=0.8), ImageSpec(48, "clahe", gamma=1.2), []),
        (ImageSpec(48, "gamma", clip_limit=2.0), ImageSpec(48, "gamma", clip_limit=9.0), []),
        (ImageSpec(48, "gamma", gamma=0.8), ImageSpec(48, "gamma", gamma=1.2), ["gamma: model 0.8, data 1.2"]),
        (ImageSpec(32, "none"), ImageSpec(48, "clahe"),
         ["image_size: model 32, data 48", "enhance: model 'none', data 'clahe'"]),
    ],
)
def test_spec_mismatches(model_spec, data_spec, expected):
    assert audit.spec_mismatches(model_spec, data_spec) == expected


# --------------------------------------------------------------------------------------------------
# Which cases are shown and audited


@pytest.mark.parametrize(
    "labels, predicted, expected",
    [
        ([1, 0, 0, 1], [1, 1, 0, 0], ["TP", "FP", "TN", "FN"]),
        ([0, 0], [False, False], ["TN", "TN"]),
        ([], [], []),
    ],
)
def test_confusion_cells(labels, predicted, expected):
    assert audit.confusion_cells(np.array(labels, dtype=int), np.array(predicted, dtype=bool)).tolist() == expected


def test_sample_order_is_a_seeded_permutation():
    first, again, other = audit.sample_order(50, 42), audit.sample_order(50, 42), audit.sample_order(50, 7)
    assert sorted(first.tolist()) == list(range(50))
    assert first.tolist() == again.tolist()
    assert first.tolist() != other.tolist()
    assert audit.sample_order(0, 42).size == 0


@pytest.mark.parametrize(
    "per_cell, expected",
    [
        # order visits positions 5, 0, 3, 1, 4, 2; cells by position: TP TN TP FN TN TN
        (1, {"TP": [5], "FP": [], "TN": [0], "FN": [1]}),
        (2, {"TP": [5, 3], "FP": [], "TN": [0, 4], "FN": [1]}),
        (0, {"TP": [], "FP": [], "TN": [], "FN": []}),
    ],
)
def test_pick_per_cell_follows_the_order(per_cell, expected):
    cells = ["TN", "FN", "TN", "TP", "TN", "TP"]
    order = np.array([5, 0, 3, 1, 4, 2])
    picks = audit.pick_per_cell(cells, order, per_cell)
    assert {cell: picks[cell].tolist() for cell in audit.CELLS} == expected


@pytest.mark.parametrize(
    "n_gated, n_context, gated, context",
    [
        (64, 16, [5, 3, 2], [0, 1, 4]),  # positive calls (TP, FP) in order, then negative calls
        (2, 1, [5, 3], [0]),
        (0, 0, [], []),
    ],
)
def test_audit_sample_gates_the_positive_calls(n_gated, n_context, gated, context):
    cells = ["TN", "FN", "FP", "TP", "TN", "TP"]
    order = np.array([5, 0, 3, 1, 4, 2])
    got_gated, got_context = audit.audit_sample(cells, order, n_gated, n_context)
    assert (got_gated.tolist(), got_context.tolist()) == (gated, context)


def test_display_pair_keeps_the_model_pixels():
    image = np.array([[0, 255], [10, 20]], dtype=np.uint8)
    heat = np.array([[0.0, 1.0], [0.5, 0.25]], dtype=np.float32)
    big_image, big_heat = audit.display_pair(image, heat, min_side=5)
    assert big_image.shape == (6, 6) and big_heat.shape == (6, 6)  # factor ceil(5 / 2) = 3
    assert (big_image[:3, :3] == 0).all() and (big_image[:3, 3:] == 255).all() and (big_image[3:, :3] == 10).all()
    assert big_heat.min() >= 0 and big_heat.max() <= 1
    same_image, same_heat = audit.display_pair(image, heat, min_side=2)
    assert same_image is image and same_heat is heat


# --------------------------------------------------------------------------------------------------
# The shortcut audit


@pytest.mark.parametrize(
    "level, expected",
    [(0.5, [[0.0, 1.0], [0.5, 0.0]]), (0.0, [[0.2, 1.0], [0.5, 0.4]]), (0.45, [[0.0, 1.0], [0.5, 0.0]])],
)
def test_salient(level, expected):
    heat = np.array([[[0.2, 1.0], [0.5, 0.4]]], dtype=np.float32)
    np.testing.assert_allclose(audit.salient(heat, level)[0], expected)


def test_widen_masks():
    mask = np.zeros((1, 7, 7), dtype=np.uint8)
    mask[0, 3, 3] = 1
    assert audit.widen_masks(mask, 0).sum() == 1
    widened = audit.widen_masks(mask, 1)[0]
    assert widened.sum() == 5 and widened[2, 3] == widened[3, 2] == widened[4, 3] == widened[3, 4] == 1  # a plus


def test_audit_heatmaps_scores_the_salient_region_in_the_widened_mask():
    size = 16
    lung = np.zeros((size, size), dtype=np.uint8)
    lung[4:12, 3:7] = 1
    inside = np.full((size, size), 0.1, dtype=np.float32)  # a diffuse floor everywhere ...
    inside[5:10, 4:6] = 1.0  # ... and the peak in the lung
    marker = np.full((size, size), 0.1, dtype=np.float32)
    marker[0:2, 13:16] = 1.0  # the peak on a corner marker
    edge = np.full((size, size), 0.1, dtype=np.float32)
    edge[5:10, 7:8] = 1.0  # the peak one pixel beside the mask: within a 2-px tolerance
    outcome = audit.audit_heatmaps(np.stack([inside, marker, edge]), np.stack([lung] * 3), 0.5, stride=2,
                                   min_heatmaps=1)
    focus = [s["lung_focus"] for s in outcome.scores]
    assert focus[0] == pytest.approx(1.0) and focus[1] == pytest.approx(0.0) and focus[2] == pytest.approx(1.0)
    assert outcome.tolerance_px == 2
    assert outcome.result.n == 3 and outcome.result.passed  # mean 2/3 >= 0.5
    strict = audit.audit_heatmaps(np.stack([inside, marker, edge]), np.stack([lung] * 3), 0.5, stride=2, min_heatmaps=1,
                                  tolerance_cells=0)
    assert [s["lung_focus"] for s in strict.scores][2] == pytest.approx(0.0)
    assert not strict.result.passed  # 1/3 < 0.5
    # Only gated heatmaps enter the verdict; the others are still scored.
    marker_only = audit.audit_heatmaps(np.stack([inside, marker, edge]), np.stack([lung] * 3), 0.5, stride=2, min_heatmaps=1,
                                       gated=np.array([False, True, False]))
    assert len(marker_only.scores) == 3 and marker_only.result.n == 1 and not marker_only.result.passed
    assert marker_only.result.lung_focus_mean == pytest.approx(0.0)
    # Only flagged masks get the tolerance (the caller leaves the generous geometric prior alone).
    unwidened = audit.audit_heatmaps(np.stack([inside, marker, edge]), np.stack([lung] * 3), 0.5, stride=2, min_heatmaps=1,
                                     widen=np.array([True, True, False]))
    assert [s["lung_focus"] for s in unwidened.scores][2] == pytest.approx(0.0)
    none = audit.audit_heatmaps(np.stack([inside]), np.stack([lung]), 0.5, stride=2, gated=np.array([False]))
    assert not none.result.passed and none.result.n == 0 and "predicted positive" in none.result.reason


def _two_lungs(size: int) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[size // 5 : 4 * size // 5, size // 8 : 3 * size // 8] = 1
    mask[size // 5 : 4 * size // 5, 5 * size // 8 : 7 * size // 8] = 1
    return mask


@pytest.mark.parametrize(
    "name, has_mask, segmenter, real, note",
    [
        ("dataset masks and the prior", [True, False, True], None, [True, False, True],
         "lung masks: 2 dataset masks, 1 from the geometric prior (gradcam.estimate_lung_mask)"),
        ("nothing real", [False, False, False], None, [False, False, False],
         "lung masks: 3 from the geometric prior (gradcam.estimate_lung_mask): no dataset lung masks and no "
         "segmenter (train one with -e segment)"),
        ("all dataset", [True, True, True], None, [True, True, True], "lung masks: 3 dataset masks"),
        ("the segmenter before the prior", [True, False, False], "two lungs", [True, True, True],
         "lung masks: 1 dataset masks, 2 segmented now by seg/1"),
        ("an implausible segmentation keeps the prior", [False, False, True], "empty", [False, False, True],
         "lung masks: 1 dataset masks, 2 from the geometric prior (gradcam.estimate_lung_mask) "
         "(2 segmentations implausible)"),
    ],
)
def test_lung_masks_prefer_real_masks_to_the_geometric_prior(synthetic_prepared, name, has_mask, segmenter,
                                                             real, note):
    rows, _ = synthetic_prepared.split_rows("test")
    rows = rows[:3]
    size = synthetic_prepared.image_size
    prior = gradcam.estimate_lung_mask(np.zeros((size, size), np.uint8))
    drawn = _two_lungs(size) if segmenter == "two lungs" else np.zeros((size, size), np.uint8)
    seen: list[int] = []

    def segment(images):
        seen.append(len(images))
        assert all(image.shape == (size, size) for image in images), name
        return [drawn.astype(bool) for _ in images]

    found = audit.lung_masks(synthetic_prepared, rows, np.array(has_mask), segment if segmenter else None, "seg/1")
    assert found.note == note, name
    np.testing.assert_array_equal(found.real, np.array(real), err_msg=name)
    for i, (own, is_real) in enumerate(zip(has_mask, real)):
        expected = synthetic_prepared.masks()[rows[i]] if own else (drawn if is_real else prior)
        np.testing.assert_array_equal(found.masks[i], expected, err_msg=f"{name}: image {i}")
    assert seen == ([has_mask.count(False)] if segmenter else []), name  # only the images without a mask
