"""Class-weight schemes, the weighted BCE reference, and Keras' weighted loss == the reference."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from cxrexp.data.tfdata import make_dataset, predict_probabilities
from cxrexp.learn.losses import class_weights, weighted_bce
from cxrexp.learn.model import build_cnn

THREE_NEG_ONE_POS = [0, 0, 0, 1]  # n0 = 3, n1 = 1, n = 4
ONE_NEG_FOUR_POS = [0, 1, 1, 1, 1]  # n0 = 1, n1 = 4, n = 5


@pytest.mark.parametrize(
    ("labels", "scheme", "beta", "expected"),
    [
        (THREE_NEG_ONE_POS, "none", 0.999, {0: 1.0, 1: 1.0}),
        # inverse: w0 = n1/n, w1 = n0/n
        (THREE_NEG_ONE_POS, "inverse", 0.999, {0: 1 / 4, 1: 3 / 4}),
        (ONE_NEG_FOUR_POS, "inverse", 0.999, {0: 4 / 5, 1: 1 / 5}),
        # balanced: n / (2 n_c)
        (THREE_NEG_ONE_POS, "balanced", 0.999, {0: 4 / 6, 1: 4 / 2}),
        (ONE_NEG_FOUR_POS, "balanced", 0.999, {0: 5 / 2, 1: 5 / 8}),
        # effective, beta = 0.5: raw (1-b)/(1-b^n_c) = 0.5/0.875 = 4/7 and 0.5/0.5 = 1; sum 11/7;
        # rescaled to sum 2: 8/11 and 14/11.
        (THREE_NEG_ONE_POS, "effective", 0.5, {0: 8 / 11, 1: 14 / 11}),
        # raw 0.5/0.5 = 1 and 0.5/0.9375 = 8/15; sum 23/15 -> 30/23 and 16/23.
        (ONE_NEG_FOUR_POS, "effective", 0.5, {0: 30 / 23, 1: 16 / 23}),
        # beta = 0: every class counts as one effective sample -> equal weights.
        (THREE_NEG_ONE_POS, "effective", 0.0, {0: 1.0, 1: 1.0}),
        # beta -> 1: inverse frequency 1/3 : 1, rescaled to sum 2 -> 0.5, 1.5 (needs expm1 precision).
        (THREE_NEG_ONE_POS, "effective", 1 - 1e-9, {0: 0.5, 1: 1.5}),
    ],
)
def test_class_weights_match_hand_computed(labels, scheme, beta, expected):
    weights = class_weights(np.array(labels, dtype=np.int64), scheme, beta)
    assert set(weights) == {0, 1}
    assert weights[0] == pytest.approx(expected[0], rel=1e-6)
    assert weights[1] == pytest.approx(expected[1], rel=1e-6)
    assert all(isinstance(v, float) for v in weights.values())


@pytest.mark.parametrize(
    ("labels", "scheme", "beta", "message"),
    [
        ([0, 0, 0], "inverse", 0.999, "0 positives"),
        ([1, 1], "balanced", 0.999, "0 negatives"),
        ([0, 1, 2], "inverse", 0.999, "0/1"),
        ([0, 1], "focal", 0.999, "not one of"),
        ([0, 1], "effective", 1.0, "effective_beta"),
        ([[0, 1]], "none", 0.999, "1-D"),
    ],
)
def test_class_weights_reject_bad_input(labels, scheme, beta, message):
    with pytest.raises(ValueError, match=message):
        class_weights(np.array(labels), scheme, beta)


@pytest.mark.parametrize(
    ("y", "p", "weights", "expected"),
    [
        # -(3 ln 0.5 + 1 ln 0.5) / 2 = 2 ln 2
        ([1, 0], [0.5, 0.5], {0: 1.0, 1: 3.0}, 2 * math.log(2)),
        # weight 2 on -ln 0.8, weight 1 on -ln(1 - 0.4)
        ([1, 0], [0.8, 0.4], {0: 1.0, 1: 2.0}, (-2 * math.log(0.8) - math.log(0.6)) / 2),
        # p = 0 for a positive is clipped to eps: -ln(1e-7)
        ([1], [0.0], {0: 1.0, 1: 1.0}, -math.log(1e-7)),
        # a perfect negative costs -ln(1 - eps) ~ 1e-7, not 0 or NaN
        ([0], [0.0], {0: 1.0, 1: 1.0}, -math.log1p(-1e-7)),
        # zero weight silences a class entirely
        ([0, 1], [0.9, 0.9], {0: 0.0, 1: 1.0}, -math.log(0.9) / 2),
    ],
)
def test_weighted_bce_hand_values(y, p, weights, expected):
    assert weighted_bce(np.array(y), np.array(p), weights) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(
    ("y", "p", "weights"),
    [
        ([], [], {0: 1.0, 1: 1.0}),
        ([0, 1], [0.5], {0: 1.0, 1: 1.0}),
        ([0, 1], [0.5, np.nan], {0: 1.0, 1: 1.0}),
        ([0, 1], [0.5, 1.5], {0: 1.0, 1: 1.0}),
        ([0, 2], [0.5, 0.5], {0: 1.0, 1: 1.0}),
        ([0, 1], [0.5, 0.5], {1: 1.0}),
    ],
)
def test_weighted_bce_rejects_bad_input(y, p, weights):
    with pytest.raises(ValueError):
        weighted_bce(np.array(y, dtype=float), np.array(p, dtype=float), weights)


@pytest.mark.parametrize("weights", [{0: 1.0, 1: 1.0}, {0: 0.25, 1: 0.75}, {0: 2.0 / 3.0, 1: 2.0}])
def test_keras_bce_with_sample_weights_equals_weighted_bce(weights):
    # Keras 3 default reduction "sum_over_batch_size": sum(w_i * bce_i) / batch size.
    y = np.array([1, 0, 0, 1, 0], dtype=np.float32)
    p = np.array([0.9, 0.2, 0.6, 0.3, 1e-9], dtype=np.float32)
    sample_weight = np.array([weights[int(label)] for label in y], dtype=np.float32)
    keras_loss = keras.losses.BinaryCrossentropy()(y[:, None], p[:, None], sample_weight=sample_weight)
    assert float(keras_loss) == pytest.approx(weighted_bce(y, p, weights), rel=1e-5)


def test_training_route_loss_equals_weighted_bce(tmp_path):
    """The compiled built-in loss over the weighted dataset (uneven last batch) == the reference."""
    size, n = 16, 7
    rng = np.random.default_rng(3)
    np.save(tmp_path / "images.npy", rng.integers(0, 256, (n, size, size), dtype=np.uint8))
    images = np.load(tmp_path / "images.npy", mmap_mode="r")
    rows = np.array([6, 0, 3, 1, 5, 2, 4], dtype=np.int64)
    labels = np.array([1, 0, 0, 1, 0, 0, 0], dtype=np.int64)
    weights = class_weights(labels, "balanced")
    model = build_cnn(size, (2,), (), 0.0, seed=1)
    model.compile(loss=keras.losses.BinaryCrossentropy())
    dataset = make_dataset(images, rows, labels, 3, shuffle=False, seed=0, weights=weights)
    keras_loss = model.evaluate(dataset, verbose=0)
    probabilities = predict_probabilities(model, images, rows, 3)
    assert keras_loss == pytest.approx(weighted_bce(labels, probabilities, weights), rel=1e-5)
    # ... and it is really weighted: the unweighted loss differs.
    assert abs(keras_loss - weighted_bce(labels, probabilities, {0: 1.0, 1: 1.0})) > 1e-3
