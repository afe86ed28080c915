"""The occlusion check's pure half (cxrexp.evaluation.occlusion): hand-drawn views, readings, refusals."""

from __future__ import annotations

import numpy as np
import pytest

from cxrexp.evaluation import metrics, model_card
from cxrexp.evaluation.occlusion import SHAPE_GREYS, VIEWS, occlusion_check, occlusion_metrics, occlusion_views, run_occlusion


def _square(size: int = 20, top: int = 5, bottom: int = 15) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[top:bottom, top:bottom] = 1
    return mask


def test_views_partition_the_image_and_fill_with_the_visible_parts_mean_grey():
    image = np.full((20, 20), 40, np.uint8)
    image[5:15, 5:15] = 200  # the lungs bright, the rest dark
    image[5, 5] = 100  # lungs' mean: (99 x 200 + 100) / 100 = 199 exactly
    mask = _square()
    views = occlusion_views(image[None], mask[None], margin=0.0)
    lungs_only, outside_only, shape_only = views["lungs_only"], views["outside_only"], views["shape_only"]
    inside = mask.astype(bool)
    # hand-checked: margin 0 keeps exactly the 10x10 square; each fill is the visible part's mean
    assert (lungs_only[0][inside] == image[inside]).all() and (lungs_only[0][~inside] == 199).all()
    assert (outside_only[0][~inside] == image[~inside]).all() and (outside_only[0][inside] == 40).all()
    assert (shape_only[0] == np.where(inside, SHAPE_GREYS[0], SHAPE_GREYS[1])).all()  # the mask, nothing else


@pytest.mark.parametrize(
    "margin, kept_pixels",
    [
        (0.0, 100),  # the 10x10 square
        (0.05, 140),  # 1 px (5 % of 20): OpenCV's 3x3 disc is a cross, so 12x12 without its 4 corners
        (0.10, 188),  # 2 px: OpenCV's 5x5 disc reaches 1 down and 2 across a corner, not 2 down: 14x14 - 4 x 2
    ],
)
def test_the_margin_widens_the_kept_region(margin, kept_pixels):
    rows, cols = np.indices((20, 20))
    image = np.where((rows + cols) % 2, 150, 100).astype(np.uint8)  # a checkerboard: the fill (~125) is neither
    lungs_only = occlusion_views(image[None], _square()[None], margin=margin)["lungs_only"]
    assert int((lungs_only[0] != lungs_only[0, 0, 0]).sum()) == kept_pixels  # the corner is always filled


@pytest.mark.parametrize(
    "images, masks, margin, message",
    [
        (np.zeros((1, 8, 8), np.uint8), np.zeros((1, 8, 9), np.uint8), 0.0, "must both be"),
        (np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8), 0.0, "must both be"),
        (np.zeros((1, 8, 8), np.float32), np.zeros((1, 8, 8), np.uint8), 0.0, "uint8"),
        (np.zeros((1, 8, 8), np.uint8), np.zeros((1, 8, 8), np.uint8), 0.5, "margin"),
    ],
)
def test_views_refuse_bad_input(images, masks, margin, message):
    with pytest.raises(ValueError, match=message):
        occlusion_views(images, masks, margin)


LABELS = np.array([0] * 40 + [1] * 40)
RNG = np.random.default_rng(1)
RANKS = LABELS * 0.6 + RNG.uniform(0, 0.4, LABELS.size)  # separates the classes perfectly
NOISE = RNG.uniform(0, 1, LABELS.size)  # no relation to the labels


@pytest.mark.parametrize(
    "lungs_only, outside_only, shape_only, first, second, third",
    [
        # a lung reader: the lungs keep the ranking, hiding them leaves noise, the shape says nothing
        (RANKS, NOISE, NOISE, "cannot be told from chance", "no loss the test cases can resolve",
         "cannot be told from chance"),
        # a hospital reader: hiding the lungs changes nothing, the lungs alone are noise
        (NOISE, RANKS, NOISE, "still ranks COVID above Normal", "loses", "cannot be told from chance"),
        # a lung-shape reader: every view that keeps the outline keeps the ranking
        (RANKS, RANKS, RANKS, "still ranks", "no loss", "their size and outline carry part of its ranking"),
        # evidence outside (and in the shape) that points the other way
        (RANKS, 1 - RANKS, 1 - RANKS, "ranks cases backwards", "no loss", "point it the wrong way"),
    ],
)
def test_readings_follow_the_intervals(lungs_only, outside_only, shape_only, first, second, third):
    result = occlusion_check(LABELS, {"whole": RANKS, "lungs_only": lungs_only, "outside_only": outside_only,
                                      "shape_only": shape_only}, n_bootstrap=300, seed=0)
    assert result.computed and result.n == 80 and result.n_positive == 40
    assert first in result.reading[0] and second in result.reading[1] and third in result.reading[2]
    logged = result.logged_metrics()
    assert logged["occlusion_whole_roc_auc"] == pytest.approx(1.0)
    assert {f"occlusion_{v}_roc_auc_ci_low" for v in VIEWS} <= logged.keys()
    assert logged["occlusion_lungs_only_auc_change"] == pytest.approx(result.change["lungs_only"].estimate)
    assert "occlusion_whole_auc_change" not in logged  # the whole view is what the others are measured against


@pytest.mark.parametrize(
    "labels, reason",
    [
        (np.zeros(5, int), "all one class"),
        (np.ones(5, int), "all one class"),
        (np.zeros(0, int), "no case has a real lung mask"),
    ],
)
def test_one_class_or_no_cases_gives_a_reason_not_a_number(labels, reason):
    probabilities = dict.fromkeys(VIEWS, np.full(labels.size, 0.5))
    result = occlusion_check(labels, probabilities, n_bootstrap=50, seed=0)
    assert not result.computed and reason in result.reason
    assert result.logged_metrics() == {"occlusion_n": float(labels.size)}
    assert occlusion_metrics(result) == result.logged_metrics()
    assert occlusion_metrics(None) == {"occlusion_n": 0.0}  # failed: recorded as 0, never missing


@pytest.mark.parametrize(
    "probabilities, message",
    [
        ({"whole": RANKS, "lungs_only": RANKS, "outside_only": RANKS}, "lack the views"),
        ({**dict.fromkeys(VIEWS, RANKS), "outside_only": RANKS[:-1]}, "probabilities for"),
        ({**dict.fromkeys(VIEWS, RANKS), "lungs_only": np.where(LABELS == 1, np.nan, 0.5)}, "non-finite"),
    ],
)
def test_a_broken_forward_pass_is_an_error_not_a_finding(probabilities, message):
    with pytest.raises(ValueError, match=message):
        occlusion_check(LABELS, probabilities, n_bootstrap=50, seed=0)


def _cases(n: int = 60, size: int = 24):
    """Images whose label is written twice: a bright dot inside the lung square and one in a corner."""
    labels = np.arange(n) % 2
    # A flat background and dim dots: one dot 50 greys above it moves the lungs' mean (144 pixels) by
    # 0.35 and the rest's (432) by 0.12, so every fill rounds to 100 and none carries the label.
    images = np.full((n, size, size), 100, np.uint8)
    images[labels == 1, 11, 11] = 150  # inside the lungs
    images[labels == 1, 1, 1] = 150  # outside, where burnt-in text would be
    masks = np.repeat(_square(size, 6, 18)[None], n, axis=0)
    return images, masks, labels


@pytest.mark.parametrize(
    "pixel, outside_reading, inside_reading",
    [
        ((11, 11), "cannot be told from chance", "no loss"),  # a model that reads the lungs
        ((1, 1), "still ranks", "loses"),  # a model that reads the corner
    ],
)
def test_run_occlusion_tells_where_a_model_reads(pixel, outside_reading, inside_reading):
    images, masks, labels = _cases()

    def predict(pixels):
        return pixels[:, pixel[0], pixel[1]].astype(np.float64) / 255.0 + np.linspace(0, 1e-3, len(pixels))

    result = run_occlusion(images, masks, labels, predict, n_bootstrap=200, seed=0, margin=0.0)
    assert outside_reading in result.reading[0] and inside_reading in result.reading[1], result.reading
    # the report's figure: every view of the first positive, then the first negative, with its probability
    titles = [title for title, _ in result.examples]
    assert len(titles) == 2 * len(VIEWS) and titles[0].startswith("COVID: whole") and titles[4].startswith("Normal")
    first_positive = int(np.flatnonzero(labels == 1)[0])
    assert (result.examples[0][1] == images[first_positive]).all() and "p=" in titles[0]


def test_run_occlusion_with_no_cases_asks_nothing_of_the_model():
    def predict(pixels):
        raise AssertionError("the model must not be asked about zero images")

    result = run_occlusion(np.zeros((0, 8, 8), np.uint8), np.zeros((0, 8, 8), np.uint8), np.zeros(0), predict,
                           n_bootstrap=10, seed=0)
    assert not result.computed


@pytest.mark.parametrize(
    "occlusion, expected",
    [
        (None, "Not run: failed: MemoryError"),
        (occlusion_check(np.zeros(3, int), dict.fromkeys(VIEWS, np.full(3, 0.5)), n_bootstrap=10, seed=0), "all one class"),
        (occlusion_check(LABELS, {"whole": RANKS, "lungs_only": NOISE, "outside_only": RANKS, "shape_only": NOISE},
                         n_bootstrap=50, seed=0),
         "outside only (lungs hidden)"),
    ],
)
def test_the_model_card_shows_the_check(occlusion, expected):
    card = model_card.ModelCard(model_uri="models:/m/1", evaluate_run_id="r", train_run_id="t", data_source="d",
                                dataset_digest="x", threshold=0.5, threshold_source="s", metrics={},
                                occlusion=occlusion,
                                occlusion_note="failed: MemoryError" if occlusion is None else "lung masks: 80 dataset masks")
    page = model_card.render_html(card)
    assert "<h2>Occlusion check</h2>" in page and expected in page
    with_figure = model_card.render_html(model_card.ModelCard(
        model_uri="m", evaluate_run_id="r", train_run_id="t", data_source="d", dataset_digest="x", threshold=0.5,
        threshold_source="s", metrics={}, occlusion=occlusion,
        occlusion_figure=model_card.Figure("Occlusion views", b"\x89PNG\r\n\x1a\n-a-figure", "the views")))
    assert "Occlusion views" in with_figure and "Occlusion views" not in page


def test_run_occlusion_uses_the_callers_whole_view():
    images, masks, labels = _cases()
    asked = []

    def predict(pixels):
        asked.append(len(pixels))
        return pixels[:, 11, 11].astype(np.float64) / 255.0 + np.linspace(0, 1e-3, len(pixels))

    whole = np.where(labels == 1, 0.1, 0.9) + np.linspace(0, 1e-3, len(labels))  # backwards: not what predict says
    result = run_occlusion(images, masks, labels, predict, n_bootstrap=50, seed=0, whole=whole)
    assert len(asked) == 3  # the three occluded views only
    assert result.auc["whole"][0] == pytest.approx(0.0)  # the caller's figures, not a forward pass
    assert "p=0.10" in result.examples[0][0]  # the first positive's whole view, titled with the caller's figure


def test_without_the_bootstrap_there_are_no_intervals_and_no_readings():
    result = occlusion_check(LABELS, {"whole": RANKS, "lungs_only": NOISE, "outside_only": RANKS, "shape_only": NOISE},
                             n_bootstrap=0, seed=0)
    assert np.isnan(result.auc["outside_only"][1]) and np.isnan(result.change["lungs_only"].high)
    assert result.change["lungs_only"].estimate == pytest.approx(result.auc["lungs_only"][0] - 1.0)
    assert all("no interval" in line and "still ranks" not in line and "loses" not in line for line in result.reading)


def test_empty_masks_are_not_occluded():
    """A stored mask with no lung pixel hides nothing real: such rows are left out, and said so by n."""
    import pandas as pd

    from cxrexp.evaluation.occlusion import occlusion_for

    images, masks, labels = _cases(n=6)
    masks[0] = 0  # an empty mask, stored as if real

    class Dataset:  # the parts of a PreparedDataset occlusion_for reads
        image_size, positive_class, negative_label = 24, "COVID", "Normal"
        manifest = pd.DataFrame({"row": np.arange(6)})

        def images(self):
            return images

        def masks(self):
            return masks

    frame = pd.DataFrame({"row": np.arange(6), "has_mask": True, "label": labels})
    result, _ = occlusion_for(Dataset(), frame, lambda p: p[:, 11, 11] / 255.0, n_bootstrap=20, seed=0)
    assert result.n == 5
    whole = np.array([0.99, 0.2, 0.7, 0.4, 0.6, 0.1])  # row 0 (dropped) would spoil the ranking if misaligned
    result, _ = occlusion_for(Dataset(), frame, lambda p: p[:, 11, 11] / 255.0, n_bootstrap=20, seed=0, whole=whole)
    assert result.auc["whole"][0] == pytest.approx(metrics.roc_auc(labels[1:], whole[1:]))


def test_chunks_give_the_same_result_as_one_pass():
    images, masks, labels = _cases(n=30)

    def predict(pixels):
        return pixels[:, 1, 1].astype(np.float64) / 255.0 + pixels[:, 11, 11] / 1000.0 + pixels.mean(axis=(1, 2)) / 1e4

    whole = run_occlusion(images, masks, labels, predict, n_bootstrap=50, seed=0, chunk=1000)
    asked = []

    def counting(pixels):
        asked.append(len(pixels))
        return predict(pixels)

    chunked = run_occlusion(images, masks, labels, counting, n_bootstrap=50, seed=0, chunk=7,
                            whole=predict(images))  # 7 does not divide 30
    assert max(asked) <= 7 and sum(asked) == 3 * 30
    assert chunked.logged_metrics() == whole.logged_metrics()
    assert [t for t, _ in chunked.examples] == [t for t, _ in whole.examples]


def test_one_class_gives_no_figure_and_a_bad_chunk_is_refused():
    images, masks, labels = _cases(n=6)
    result = run_occlusion(images, masks, np.zeros(6, int), lambda p: p[:, 1, 1] / 255.0, n_bootstrap=10, seed=0)
    assert not result.computed and result.examples == ()
    with pytest.raises(ValueError, match="chunk"):
        run_occlusion(images, masks, labels, lambda p: p[:, 1, 1] / 255.0, n_bootstrap=10, seed=0, chunk=0)


def test_evaluate_passes_its_occlusion_margin_flag_to_the_check(monkeypatch):
    from cxrexp.config import EvaluateConfig
    from cxrexp.mlflow_edge import evaluation_logging

    seen = {}

    def fake_occlusion_for(dataset, frame, predict, **kwargs):
        seen.update(kwargs)
        return occlusion_check(np.zeros(0), dict.fromkeys(VIEWS, np.zeros(0)), n_bootstrap=0, seed=0), "note"

    monkeypatch.setattr(evaluation_logging, "occlusion_for", fake_occlusion_for)
    evaluation_logging.occlusion(None, None, None, EvaluateConfig(occlusion_margin=0.2))
    assert seen["margin"] == 0.2
