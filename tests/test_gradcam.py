"""cxrexp.gradcam: heatmaps on tiny functional models (32 px, 2 conv blocks), overlays, the audit."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from cxrexp.evaluation import gradcam

SIZE = 32


def tiny_cnn(logit_initializer: str = "glorot_uniform") -> keras.Model:
    """The model.py contract in miniature: input "image", block{i}_conv, "logit", "probability"."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 1), name="image")
    x = inputs
    for i, filters in enumerate((4, 8), start=1):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"block{i}_conv")(x)
        x = keras.layers.MaxPooling2D(name=f"block{i}_pool")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    logit = keras.layers.Dense(1, kernel_initializer=logit_initializer, name="logit")(x)
    probability = keras.layers.Activation("sigmoid", name="probability")(logit)
    return keras.Model(inputs, probability, name="tiny_cnn")


def brightness_cnn() -> keras.Model:
    """Hand-set weights: feature map = image (1x1 conv, weight 1), logit = its mean.

    The gradient of the logit is uniform over the map, so Grad-CAM = relu(image) / max: the heatmap
    must reproduce the image's bright region exactly.
    """
    inputs = keras.Input((SIZE, SIZE, 1), name="image")
    x = keras.layers.Conv2D(1, 1, use_bias=False, kernel_initializer="ones", name="block1_conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    logit = keras.layers.Dense(1, kernel_initializer="ones", bias_initializer="zeros", name="logit")(x)
    return keras.Model(inputs, keras.layers.Activation("sigmoid", name="probability")(logit))


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.random((3, SIZE, SIZE, 1)).astype(np.float32)


@pytest.fixture(scope="module")
def model_and_reloaded(tmp_path_factory):
    model = tiny_cnn()
    path = tmp_path_factory.mktemp("model") / "tiny.keras"
    model.save(path)
    return model, keras.saving.load_model(path)


def test_last_conv_layer_name(model_and_reloaded):
    model, reloaded = model_and_reloaded
    assert gradcam.last_conv_layer_name(model) == "block2_conv"
    assert gradcam.last_conv_layer_name(reloaded) == "block2_conv"


def test_last_conv_layer_name_without_conv_raises():
    inputs = keras.Input((4,), name="image")
    model = keras.Model(inputs, keras.layers.Dense(1, name="logit")(inputs))
    with pytest.raises(ValueError, match="no Conv2D"):
        gradcam.last_conv_layer_name(model)


@pytest.mark.parametrize("conv_layer", [None, "block1_conv"])
def test_gradcam_shape_range_and_reload(model_and_reloaded, images, conv_layer):
    model, reloaded = model_and_reloaded
    heatmaps = gradcam.gradcam(model, images, conv_layer)
    assert heatmaps.shape == (3, SIZE, SIZE) and heatmaps.dtype == np.float32
    assert np.isfinite(heatmaps).all()
    assert heatmaps.min() >= 0 and heatmaps.max() <= 1
    assert heatmaps.reshape(3, -1).max(axis=1) == pytest.approx(1.0, abs=1e-4)  # normalised per image
    np.testing.assert_allclose(gradcam.gradcam(reloaded, images, conv_layer), heatmaps, atol=1e-6)


def test_gradcam_batches_agree(model_and_reloaded, images):
    model, _ = model_and_reloaded
    together = gradcam.gradcam(model, images)
    one_by_one = gradcam.gradcam(model, images, batch_size=1)
    np.testing.assert_allclose(one_by_one, together, atol=1e-5)


def test_gradcam_reproduces_the_bright_region():
    image = np.zeros((1, SIZE, SIZE, 1), dtype=np.float32)
    image[0, 8:16, 20:28, 0] = 0.8
    heatmap = gradcam.gradcam(brightness_cnn(), image)[0]
    expected = np.zeros((SIZE, SIZE), dtype=np.float32)
    expected[8:16, 20:28] = 1.0
    np.testing.assert_allclose(heatmap, expected, atol=1e-5)


def test_all_zero_heatmap_stays_zero():
    heatmaps = gradcam.gradcam(tiny_cnn(logit_initializer="zeros"), np.full((2, SIZE, SIZE, 1), 0.5, np.float32))
    assert np.isfinite(heatmaps).all()
    assert heatmaps.max() == 0.0


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((1, SIZE, SIZE, 1), np.uint8), "divide by 255"),
        (np.full((1, SIZE, SIZE, 1), 2.0, np.float32), "in \\[0, 1\\]"),
        (np.zeros((1, SIZE, SIZE, 3), np.float32), "\\(B, S, S, 1\\)"),
    ],
)
def test_gradcam_bad_images_raise(model_and_reloaded, bad, message):
    with pytest.raises(ValueError, match=message):
        gradcam.gradcam(model_and_reloaded[0], bad)


def _position_reader(size: int = 8):
    """A conv layer passing the image through and a dense logit reading only pixel (1, 1)."""
    inputs = keras.Input((size, size, 1), name="image")
    features = keras.layers.Conv2D(1, 1, activation="relu", kernel_initializer="ones", bias_initializer="zeros",
                                   name="block1_conv")(inputs)
    flat = keras.layers.Flatten()(features)
    weights = np.zeros((size * size, 1), np.float32)
    weights[1 * size + 1] = 1.0
    logit = keras.layers.Dense(1, name="logit", kernel_initializer=keras.initializers.Constant(weights))(flat)
    return keras.Model(inputs, keras.layers.Activation("sigmoid", name="probability")(logit))


@pytest.mark.parametrize(
    "method, hot",
    [
        # Grad-CAM averages the (position-specific) gradient into one channel weight: every bright pixel lights up.
        ("gradcam", {(1, 1), (6, 6)}),
        # HiResCAM keeps gradient x activation per position: only the pixel the dense head reads.
        ("hirescam", {(1, 1)}),
    ],
)
def test_cam_methods_on_a_dense_head(method, hot):
    image = np.zeros((1, 8, 8, 1), np.float32)
    image[0, 1, 1, 0] = image[0, 6, 6, 0] = 1.0
    heat = gradcam.gradcam(_position_reader(), image, method=method)[0]
    assert {(int(r), int(c)) for r, c in zip(*np.nonzero(heat > 0.9))} == hot


# ---------------------------------------------------------------------------------------------- #
# Overlays


def test_overlay_blends_jet_over_the_image():
    image = np.full((SIZE, SIZE), 100, np.uint8)
    heatmap = np.zeros((SIZE, SIZE), np.float32)
    heatmap[:, SIZE // 2 :] = 1.0
    out = gradcam.overlay(image, heatmap, alpha=0.5)
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
    # jet(0) is dark blue (0, 0, 128), jet(1) dark red (128, 0, 0), in RGB: 0.5 * 100 + 0.5 * jet.
    np.testing.assert_allclose(out[0, 0], [50, 50, 114], atol=2)
    np.testing.assert_allclose(out[0, -1], [114, 50, 50], atol=2)


def test_overlay_resizes_a_smaller_heatmap():
    out = gradcam.overlay(np.zeros((SIZE, SIZE), np.uint8), np.ones((8, 8)))
    assert out.shape == (SIZE, SIZE, 3)


def test_contour_overlay_draws_only_around_the_hot_region():
    image = np.full((SIZE, SIZE), 60, np.uint8)
    heatmap = np.zeros((SIZE, SIZE), np.float32)
    heatmap[10:20, 10:20] = 1.0
    out = gradcam.contour_overlay(image, heatmap, levels=(0.5, 0.75))
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
    changed = np.any(out != 60, axis=2)
    rows, cols = np.nonzero(changed)
    assert changed.any()
    assert rows.min() >= 9 and rows.max() <= 20 and cols.min() >= 9 and cols.max() <= 20
    assert not changed[15, 15]  # the inside of the region keeps the anatomy visible


# ---------------------------------------------------------------------------------------------- #
# Shortcut audit


@pytest.mark.parametrize(
    "size, frac, width",
    [(32, 0.12, 4), (100, 0.1, 10), (10, 0.01, 1)],  # round(3.84) = 4; at least one pixel
)
def test_border_band(size, frac, width):
    band = gradcam.border_band(size, frac)
    assert band.shape == (size, size) and band.dtype == bool
    assert band[:width].all() and band[:, -width:].all()
    assert not band[width:-width, width:-width].any()
    assert band.sum() == size * size - (size - 2 * width) ** 2


def test_estimate_lung_mask_is_two_lungs_inside_the_border():
    mask = gradcam.estimate_lung_mask(np.zeros((64, 64), np.uint8))
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    assert not (mask.astype(bool) & gradcam.border_band(64)).any()
    assert mask[30, 18] == 1 and mask[30, 45] == 1  # mid-height of each half: lung
    assert mask[30, 32] == 0  # the mediastinum between them
    assert 0.25 < mask.mean() < 0.5


def hand_heatmaps():
    size = 32
    lung = gradcam.estimate_lung_mask(np.zeros((size, size), np.uint8))
    border = gradcam.border_band(size)
    half = np.zeros((size, size))
    half[0, 0] = 1.0  # border corner
    half[15, 9] = 1.0  # inside the left lung
    return {
        # id: (heatmap, lung_mask, lung_focus, border_share)
        "all mass in lung": (lung.astype(float), lung, 1.0, 0.0),
        "all mass in border": (border.astype(float), lung, 0.0, 1.0),
        "half and half": (half, lung, 0.5, 0.5),
    }


@pytest.mark.parametrize("case", hand_heatmaps().values(), ids=hand_heatmaps().keys())
def test_focus_scores(case):
    heatmap, lung_mask, lung_focus, border_share = case
    scores = gradcam.focus_scores(heatmap, lung_mask)
    assert scores["lung_focus"] == pytest.approx(lung_focus)
    assert scores["border_share"] == pytest.approx(border_share)
    assert scores["reason"] == ""


def test_focus_scores_all_zero_heatmap_is_nan_with_reason():
    scores = gradcam.focus_scores(np.zeros((32, 32)), np.ones((32, 32), np.uint8))
    assert math.isnan(scores["lung_focus"]) and math.isnan(scores["border_share"])
    assert "all-zero" in scores["reason"]


def test_focus_scores_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same square shape"):
        gradcam.focus_scores(np.ones((32, 32)), np.ones((16, 16)))


NAN_SCORE = {"lung_focus": float("nan"), "border_share": float("nan"), "reason": "all-zero heatmap"}


@pytest.mark.parametrize(
    "lung_focus, min_lung_focus, passed, n, mean",
    [
        ([0.9, 0.7, 0.5], 0.5, True, 3, 0.7),
        ([0.4, 0.3, 0.5], 0.5, False, 3, 0.4),
        ([0.5], 0.5, True, 1, 0.5),  # the gate is inclusive
        ([0.9, None], 0.5, True, 1, 0.9),  # None: an all-zero heatmap, skipped
        ([None, None], 0.5, False, 0, float("nan")),
    ],
)
def test_audit(lung_focus, min_lung_focus, passed, n, mean):
    scores = [
        NAN_SCORE if value is None else {"lung_focus": value, "border_share": 1 - value, "reason": ""}
        for value in lung_focus
    ]
    result = gradcam.audit(scores, min_lung_focus, min_heatmaps=1)
    assert result.passed is passed and result.n == n
    if math.isnan(mean):
        assert math.isnan(result.lung_focus_mean) and "no usable heatmap" in result.reason
    else:
        assert result.lung_focus_mean == pytest.approx(mean)
        assert result.border_share_mean == pytest.approx(1 - mean)
    if None in lung_focus:
        assert "all-zero heatmaps skipped" in result.reason
    if not passed and n:
        assert "outside the lungs" in result.reason


def test_audit_median():
    scores = [{"lung_focus": v, "border_share": 0.0, "reason": ""} for v in (0.1, 0.8, 0.9)]
    assert gradcam.audit(scores, 0.5, min_heatmaps=3).lung_focus_median == pytest.approx(0.8)


@pytest.mark.parametrize(
    "usable, zero, min_heatmaps, passed, n",
    [
        (9, 0, gradcam.MIN_AUDIT_HEATMAPS, False, 9),  # one short of the default: no verdict
        (10, 0, gradcam.MIN_AUDIT_HEATMAPS, True, 10),
        (9, 5, 10, False, 9),  # all-zero maps do not count towards the minimum
        (3, 0, 3, True, 3),
    ],
)
def test_audit_needs_a_minimum_of_usable_heatmaps(usable, zero, min_heatmaps, passed, n):
    scores = [{"lung_focus": 0.9, "border_share": 0.0, "lung_focus_lift": 2.0, "reason": ""}] * usable + [NAN_SCORE] * zero
    result = gradcam.audit(scores, 0.5, min_heatmaps=min_heatmaps)
    assert result.passed is passed and result.n == n
    if not passed:
        assert f"only {usable} usable heatmaps" in result.reason and f"the {min_heatmaps} the audit needs" in result.reason
        assert math.isnan(result.lung_focus_mean)
    else:
        assert result.lung_focus_lift_mean == pytest.approx(2.0) and "lift 2.00x" in result.reason


@pytest.mark.parametrize(
    "name, lung_focus, lift, min_lift, passed, words",
    [
        # A lung-cut view: the masks cover ~60 % of the image, so an even spread has lung focus 0.6.
        ("an even spread sits exactly at the gate (inclusive, like lung focus)", 0.6, 1.0, 1.0, True,
         "lift 1.00x >= 1.00x"),
        ("below chance on a large mask: focus passes, lift does not", 0.55, 0.9, 1.0, False, "lift 0.90x < 1.00x"),
        ("the failed-lift reason gives the border share", 0.55, 0.9, 1.0, False, "mean border share 0.00"),
        ("just below the gate reads as below, not '1.00x < 1.00x'", 0.6, 0.998, 1.0, False, "lift 0.998x < 1.000x"),
        ("a focus just below its gate too", 0.4996, 1.5, 1.0, False, "mean lung focus 0.4996 < 0.5000"),
        ("closer than four decimals", 0.49999999, 1.5, 1.0, False, "mean lung focus 0.4999999900 < 0.5000000000"),
        ("evidence on the lungs of a large mask", 0.9, 1.5, 1.0, True, "lift 1.50x >= 1.00x"),
        ("lift not gated (0): focus alone decides", 0.55, 0.9, 0.0, True, "lift 0.90x the mask"),
        ("the focus gate still comes first", 0.3, 1.5, 1.0, False, "outside the lungs"),
        ("no lift to judge (empty masks) while it is gated", 0.6, None, 1.0, False, "no lift could be computed"),
    ],
)
def test_audit_gates_the_lift_too(name, lung_focus, lift, min_lift, passed, words):
    score = {"lung_focus": lung_focus, "border_share": 0.0, "reason": "",
             "lung_focus_lift": float("nan") if lift is None else lift}
    result = gradcam.audit([score] * 12, 0.5, min_lung_focus_lift=min_lift)
    assert result.passed is passed, (name, result.reason)
    assert words in result.reason, (name, result.reason)
    assert "{" not in result.reason, result.reason  # every placeholder filled in


@pytest.mark.parametrize(
    "value, gate, expected",
    [
        (0.998, 1.0, ("0.998", "1.000")),
        (0.30, 0.5, ("0.30", "0.50")),
        (0.6549, 0.655, ("0.65", "0.655")),  # the gate as configured, never rounded to 0.66
        (0.9999999999999999, 1.0, ("0.9999999999999999", "1.0")),  # below only by float noise: in full
    ],
)
def test_a_failed_gate_reads_as_below_it(value, gate, expected):
    assert gradcam._unequal(value, gate) == expected


def test_audit_refuses_a_bad_lift_gate():
    with pytest.raises(ValueError, match="min_lung_focus_lift"):
        gradcam.audit([], 0.5, min_lung_focus_lift=float("nan"))


@pytest.mark.parametrize(
    "name, heat_region, mask_region, lift",
    [
        ("uniform heatmap: lift 1 whatever the mask", (slice(None), slice(None)), (slice(0, 16), slice(None)), 1.0),
        ("uniform heatmap, quarter mask", (slice(None), slice(None)), (slice(0, 16), slice(0, 16)), 1.0),
        ("all mass in a quarter mask", (slice(0, 16), slice(0, 16)), (slice(0, 16), slice(0, 16)), 4.0),
        ("none in the mask", (slice(16, 32), slice(16, 32)), (slice(0, 16), slice(0, 16)), 0.0),
    ],
)
def test_focus_scores_lift_is_focus_over_the_masks_area_share(name, heat_region, mask_region, lift):
    heat = np.zeros((32, 32))
    heat[heat_region] = 1.0
    mask = np.zeros((32, 32), np.uint8)
    mask[mask_region] = 1
    assert gradcam.focus_scores(heat, mask)["lung_focus_lift"] == pytest.approx(lift), name


def test_focus_scores_empty_mask_has_no_lift():
    scores = gradcam.focus_scores(np.ones((32, 32)), np.zeros((32, 32), np.uint8))
    assert scores["lung_focus"] == 0.0 and math.isnan(scores["lung_focus_lift"]) and "empty lung mask" in scores["reason"]


def test_a_nan_heatmap_is_an_error_not_a_zero_map(images):
    model = tiny_cnn()
    logit = model.get_layer("logit")
    kernel, bias = logit.get_weights()
    kernel[0] = np.nan  # a NaN weight (diverged training): every logit and its gradient are NaN
    logit.set_weights([kernel, bias])
    with pytest.raises(gradcam.NonFiniteHeatmap, match="NaN or inf for 3 of 3 images") as caught:
        gradcam.gradcam(model, images)
    assert caught.value.indices == [0, 1, 2]


def test_gradcam_on_build_cnn_after_reload(tmp_path, images):
    """The real model contract (cxrexp.learn.model.build_cnn), saved and reloaded from .keras."""
    from cxrexp.learn.model import build_cnn

    model = build_cnn(SIZE, (4, 8), (8,), 0.2, 0)
    model.save(tmp_path / "cnn.keras")
    reloaded = keras.saving.load_model(tmp_path / "cnn.keras")
    assert gradcam.last_conv_layer_name(reloaded) == "block2_conv"
    heatmaps = gradcam.gradcam(reloaded, images)
    assert heatmaps.shape == (3, SIZE, SIZE) and np.isfinite(heatmaps).all()
    np.testing.assert_allclose(heatmaps, gradcam.gradcam(model, images), atol=1e-6)
