"""Grad-CAM heatmaps, overlays, and the shortcut audit (does the model look at the lungs?).

The model contract (``cxrexp/learn/model.py``, names in ``cxrexp/layer_names.py``): a functional Keras model whose input is ``image`` float32
(S, S, 1) in [0, 1], with conv layers ``block{i}_conv``, a ``Dense(1, name="logit")`` and then
``Activation("sigmoid", name="probability")``. Functional (not Sequential) so the layer graph, and
with it Grad-CAM, survives ``keras.saving.load_model`` of a ``.keras`` file.

Everything here is pure: arrays in, arrays and dataclasses out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import keras
import numpy as np
import tensorflow as tf

from cxrexp.config import BORDER_FRACTION, MIN_AUDIT_HEATMAPS
from cxrexp.layer_names import LOGIT_NAME as LOGIT_LAYER

# Below this total mass a heatmap is "all zero": the model's logit did not depend on any location.
_MASS_EPS = 1e-8
# Floor of the max a heatmap is divided by: an all-zero heatmap stays 0 instead of 0/0 = NaN, while
# real maps (whose raw scale can be ~1e-6: small logit gradients) are still normalised exactly.
_NORM_EPS = 1e-12


class NonFiniteHeatmap(ValueError):
    """Grad-CAM gave NaN or inf: the model's logit or its gradient is not finite for these images."""

    def __init__(self, indices: list[int], total: int):
        self.indices = indices
        shown = ", ".join(map(str, indices[:10])) + (" ..." if len(indices) > 10 else "")
        super().__init__(
            f"Grad-CAM is NaN or inf for {len(indices)} of {total} images (positions {shown}): the model's "
            "logit or gradient is not finite there (diverged training or NaN weights); no heatmap is made "
            "up for them, so the audit cannot pass"
        )


def last_conv_layer_name(model: keras.Model) -> str:
    """Name of the last ``Conv2D`` layer in layer order (the Grad-CAM target); ValueError if none.

    By type rather than by the ``block{i}_conv`` names, so Grad-CAM also works on models not built here.
    """
    for layer in reversed(model.layers):
        if isinstance(layer, keras.layers.Conv2D):
            return layer.name
    raise ValueError(
        f"model {model.name!r} has no Conv2D layer (layers: {[layer.name for layer in model.layers]}); "
        "Grad-CAM needs a convolutional feature map"
    )


# --------------------------------------------------------------------------------------------------
# Heatmaps


def _check_images(images) -> np.ndarray:
    """-> float32 (B, S, S, 1); accepts (B, S, S) too. Raises on uint8 or values outside [0, 1]."""
    arr = np.asarray(images)
    if arr.dtype == np.uint8:
        raise ValueError("images are uint8; Grad-CAM wants float32 in [0, 1] (divide by 255 first)")
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] != 1 or arr.shape[1] != arr.shape[2]:
        raise ValueError(f"images must be (B, S, S, 1) or (B, S, S); got shape {arr.shape}")
    arr = arr.astype(np.float32, copy=False)
    if arr.size and (not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1):
        raise ValueError(
            f"images must be finite and in [0, 1]; got range [{np.nanmin(arr)}, {np.nanmax(arr)}]"
        )
    return arr


def _gradcam_model(model: keras.Model, conv_layer: str | None) -> keras.Model:
    conv_name = conv_layer or last_conv_layer_name(model)
    names = [layer.name for layer in model.layers]
    for needed in (conv_name, LOGIT_LAYER):
        if needed not in names:
            raise ValueError(
                f"model {model.name!r} has no layer {needed!r} (layers: {names}); build it with "
                "cxrexp.learn.model.build_cnn or pass conv_layer="
            )
    return keras.Model(
        model.inputs, [model.get_layer(conv_name).output, model.get_layer(LOGIT_LAYER).output]
    )


def unavailable_reason(model: keras.Model) -> str:
    """Why Grad-CAM cannot explain ``model`` ("" when it can): it needs a conv layer and a logit layer."""
    try:
        _gradcam_model(model, None)
    except ValueError as err:
        return f"Grad-CAM unavailable for this model: {err}"
    return ""


CAM_METHODS = ("gradcam", "hirescam")


def gradcam(
    model: keras.Model,
    images,
    conv_layer: str | None = None,
    *,
    batch_size: int = 32,
    method: str = "gradcam",
) -> np.ndarray:
    """Grad-CAM heatmaps for the positive class.

    images: float32 (B, S, S, 1) (or (B, S, S)) in [0, 1], what the model takes.
    conv_layer: the feature map to explain; default the last Conv2D layer.
    Returns float32 (B, S, S) in [0, 1], each heatmap divided by max(its max, epsilon): an
    all-zero heatmap (the logit ignores every location) stays all zero. A NaN or inf anywhere raises
    ``NonFiniteHeatmap`` naming the images: it is a broken model, not a map without evidence.

    Gradients are taken of the pre-sigmoid ``logit`` output, not of the probability: a saturated
    sigmoid (p ~ 0 or 1) has a vanishing derivative and would give empty maps for confident cases.

    method: ``"gradcam"`` weights each channel by its gradient averaged over positions (Selvaraju
    et al.); ``"hirescam"`` multiplies gradient and activation position by position before summing
    the channels (Draelos & Carin, 2020). With a Flatten + Dense head, as ``build_cnn`` has, the
    gradient differs from position to position and averaging it smears the map over the image;
    HiResCAM keeps where the logit's evidence actually sits (the shortcut audit uses it).
    """
    if method not in CAM_METHODS:
        raise ValueError(f"method={method!r} is not one of {CAM_METHODS}")
    image_arr = _check_images(images)
    n_images, size = image_arr.shape[0], image_arr.shape[1]
    if n_images == 0:
        return np.zeros((0, size, size), dtype=np.float32)
    grad_model = _gradcam_model(model, conv_layer)
    heatmaps = []
    for start in range(0, n_images, batch_size):
        batch = tf.convert_to_tensor(image_arr[start : start + batch_size])
        with tf.GradientTape() as tape:
            feature_maps, logits = grad_model(batch, training=False)
            # Summing over the batch is safe: each logit depends only on its own image.
            target = tf.reduce_sum(logits)
        grads = tape.gradient(target, feature_maps)  # (b, h, w, c)
        if method == "gradcam":
            grads = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)  # (b, 1, 1, c) channel weights
        cams = tf.nn.relu(tf.reduce_sum(grads * feature_maps, axis=-1, keepdims=True))
        cams = tf.image.resize(cams, (size, size), method="bilinear")[..., 0]
        heatmaps.append(np.asarray(cams, dtype=np.float32))
    heatmap_arr = np.concatenate(heatmaps, axis=0)
    broken = ~np.isfinite(heatmap_arr).all(axis=(1, 2))
    if broken.any():
        raise NonFiniteHeatmap(np.flatnonzero(broken).tolist(), n_images)
    heatmap_arr = np.maximum(heatmap_arr, 0.0)
    peaks = heatmap_arr.max(axis=(1, 2), keepdims=True)
    return np.clip(heatmap_arr / np.maximum(peaks, _NORM_EPS), 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Overlays


def _check_pair(image, heatmap) -> tuple[np.ndarray, np.ndarray]:
    """-> (uint8 HxW, float32 HxW in [0, 1]); the heatmap is resized to the image when they differ."""
    image_arr = np.asarray(image)
    if image_arr.dtype != np.uint8 or image_arr.ndim != 2:
        raise ValueError(
            f"image must be uint8 HxW grey; got {image_arr.dtype} {image_arr.shape} "
            "(convert with (x * 255).round().astype(np.uint8))"
        )
    heat = np.nan_to_num(np.asarray(heatmap, dtype=np.float32), nan=0.0)
    if heat.ndim != 2:
        raise ValueError(f"heatmap must be 2-D; got shape {heat.shape}")
    if heat.shape != image_arr.shape:
        heat = cv2.resize(heat, image_arr.shape[::-1], interpolation=cv2.INTER_LINEAR)
    return image_arr, np.clip(heat, 0.0, 1.0)


def overlay(image, heatmap, alpha: float = 0.4) -> np.ndarray:
    """Jet-coloured heatmap blended over the grey image.

    image: uint8 (H, W); heatmap: float (H, W) in [0, 1] (resized if its size differs).
    Returns uint8 (H, W, 3) RGB: ``(1 - alpha) * image + alpha * jet(heatmap)``.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha={alpha} must be in [0, 1]")
    image_arr, heat = _check_pair(image, heatmap)
    colour = cv2.applyColorMap(np.round(heat * 255).astype(np.uint8), cv2.COLORMAP_JET)
    colour = cv2.cvtColor(colour, cv2.COLOR_BGR2RGB)  # OpenCV is BGR; matplotlib and PNGs are RGB
    grey_rgb = np.repeat(image_arr[..., None], 3, axis=2)
    return cv2.addWeighted(grey_rgb, 1.0 - alpha, colour, alpha, 0.0)


# RGB colours for successive contour levels: yellow, red, magenta, cyan.
_CONTOUR_COLOURS = ((255, 255, 0), (255, 0, 0), (255, 0, 255), (0, 255, 255))


def contour_overlay(image, heatmap, levels: tuple[float, ...] = (0.5, 0.75)) -> np.ndarray:
    """The grey image with the heatmap's iso-contours drawn on it (as in the published experiment).

    image: uint8 (H, W); heatmap: float (H, W) in [0, 1]; levels: fractions in (0, 1), each drawn in
    its own colour (yellow, red, ...). Unlike ``overlay`` the anatomy stays visible under the map.
    Returns uint8 (H, W, 3) RGB.
    """
    image_arr, heat = _check_pair(image, heatmap)
    canvas = np.ascontiguousarray(np.repeat(image_arr[..., None], 3, axis=2))
    thickness = max(1, min(image_arr.shape) // 128)
    for i, level in enumerate(levels):
        if not 0 < level < 1:
            raise ValueError(f"contour level {level} must be in (0, 1)")
        region = (heat >= level).astype(np.uint8)
        contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(canvas, contours, -1, _CONTOUR_COLOURS[i % len(_CONTOUR_COLOURS)], thickness)
    return canvas


# --------------------------------------------------------------------------------------------------
# Shortcut audit


def border_band(size: int, frac: float = BORDER_FRACTION) -> np.ndarray:
    """bool (size, size): True within ``round(frac * size)`` pixels (at least 1) of any edge.

    Where burnt-in labels, markers, collimation edges and scanner text sit: a model that looks there
    has learnt the source, not the disease.
    """
    if size < 1 or not 0 <= frac < 0.5:
        raise ValueError(f"border_band(size={size}, frac={frac}): need size >= 1 and frac in [0, 0.5)")
    width = max(1, int(round(frac * size))) if frac > 0 else 0
    band = np.zeros((size, size), dtype=bool)
    if width:
        band[:width, :] = band[-width:, :] = True
        band[:, :width] = band[:, -width:] = True
    return band


def estimate_lung_mask(image, border_frac: float = BORDER_FRACTION) -> np.ndarray:
    """A crude, deliberately generous lung-field prior for datasets without lung masks.

    image: uint8 (S, S) (only its size is used). Returns uint8 (S, S) in {0, 1}.

    Choice: two ellipses, one per half of a PA chest film (centres at 29 % and 71 % of the width,
    48 % of the height; semi-axes 19 % x 34 % of the size), minus the border band. A geometric prior
    rather than intensity thresholding (e.g. Otsu) because it cannot be fooled by the very artefacts
    the audit looks for (bright labels, dark collimation) and gives the same region for every image,
    so lung-focus scores are comparable across images and models. It covers roughly 40 % of the image:
    a heatmap spread uniformly scores about that, well below a ``min_lung_focus`` of 0.5.
    Prefer the dataset's own masks when it has them.
    """
    image_arr = np.asarray(image)
    if image_arr.ndim != 2 or image_arr.shape[0] != image_arr.shape[1]:
        raise ValueError(f"image must be square (S, S); got shape {image_arr.shape}")
    size = image_arr.shape[0]
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    rows /= size
    cols /= size
    mask = np.zeros((size, size), dtype=bool)
    for centre_x in (0.29, 0.71):
        mask |= ((cols - centre_x) / 0.19) ** 2 + ((rows - 0.48) / 0.34) ** 2 <= 1.0
    mask &= ~border_band(size, border_frac)
    return mask.astype(np.uint8)


def focus_scores(heatmap, lung_mask, border_frac: float = BORDER_FRACTION) -> dict:
    """Where a heatmap's mass lies.

    heatmap: float (S, S) >= 0 (negative values are clipped to 0); lung_mask: (S, S) in {0, 1}.
    Returns {"lung_focus": share of the mass inside the lung mask, "border_share": share inside the
    border band, "lung_focus_lift": lung focus / the mask's area share, "reason": ""}. Shares are in
    [0, 1]; the lift is 1.0 for a heatmap spread evenly over the image whatever the mask's size (so
    a 40 % mask and a 20 % one can be compared), above 1 where the evidence concentrates in the lungs.
    An all-zero heatmap has no mass to share, an empty mask no area: those values are NaN and
    "reason" says why.
    """
    heat = np.asarray(heatmap, dtype=np.float64)
    mask = np.asarray(lung_mask)
    if heat.ndim != 2 or heat.shape[0] != heat.shape[1] or heat.shape != mask.shape:
        raise ValueError(
            f"heatmap {heat.shape} and lung_mask {mask.shape} must be the same square shape "
            "(resize the mask with cxrexp.preprocess.prepare_mask)"
        )
    if not np.isfinite(heat).all():
        raise ValueError("heatmap holds NaN or inf values")
    heat = np.maximum(heat, 0.0)
    mass = heat.sum()
    nan = float("nan")
    if mass <= _MASS_EPS:
        return {
            "lung_focus": nan,
            "border_share": nan,
            "lung_focus_lift": nan,
            "reason": "all-zero heatmap: the logit does not depend on any image location",
        }
    area_share = float(np.count_nonzero(mask)) / mask.size
    lung_focus = float(heat[mask > 0].sum() / mass)
    return {
        "lung_focus": lung_focus,
        "border_share": float(heat[border_band(heat.shape[0], border_frac)].sum() / mass),
        "lung_focus_lift": lung_focus / area_share if area_share > 0 else nan,
        "reason": "" if area_share > 0 else "empty lung mask: no lift",
    }


@dataclass(frozen=True)
class AuditResult:
    """Summary of the lung-focus audit over ``n`` scored heatmaps (all-zero ones excluded).

    passed: mean lung focus >= min_lung_focus and mean lung-focus lift >= min_lung_focus_lift, over at
    least ``MIN_AUDIT_HEATMAPS`` usable heatmaps. reason: one line a reader of the run can act on.
    """

    lung_focus_mean: float
    lung_focus_median: float
    border_share_mean: float
    n: int
    passed: bool
    reason: str
    lung_focus_lift_mean: float = float("nan")

    @classmethod
    def undecided(cls, reason: str, n: int = 0) -> AuditResult:
        """No verdict (too little to score): NaN statistics, not passed, and ``reason`` why."""
        nan = float("nan")
        return cls(nan, nan, nan, n, False, reason)


def _unequal(value: float, gate: float) -> tuple[str, str]:
    """A failed gate's ``value`` (< ``gate``) and ``gate`` as text that reads as below it: the fewest
    decimals (2, 3, 4, then 10) at which the printed value is below the gate, so a failed gate never
    reads "1.00x < 1.00x" (a lift of 0.998 against 1.0 did). The gate is printed exactly (0.655 stays
    0.655, never "0.66"); a value below it only by float noise prints in full."""
    for digits in (2, 3, 4, 10):
        shown = f"{value:.{digits}f}"
        if float(shown) < gate:
            gate_shown = f"{gate:.{digits}f}" if round(gate, digits) == gate else repr(float(gate))
            return shown, gate_shown
    return repr(float(value)), repr(float(gate))


def audit(scores: list[dict], min_lung_focus: float, min_heatmaps: int = MIN_AUDIT_HEATMAPS,
          min_lung_focus_lift: float = 0.0) -> AuditResult:
    """Pass/fail the shortcut audit from ``focus_scores`` results, over at least ``min_heatmaps`` usable
    heatmaps (fewer: no verdict, not passed). Two gates, both on means over the usable heatmaps: lung
    focus >= ``min_lung_focus`` (most of the evidence on the lungs) and, when ``min_lung_focus_lift``
    > 0, lung-focus lift >= it. The second matters where the mask covers most of the image (a lung-cut
    view: about 60 %), where an evenly spread heatmap already clears the first; lift 1.0 is exactly
    that even spread. 0 leaves the lift ungated."""
    if not 0 <= min_lung_focus <= 1:
        raise ValueError(f"min_lung_focus={min_lung_focus} must be in [0, 1]")
    if not (math.isfinite(min_lung_focus_lift) and min_lung_focus_lift >= 0):
        raise ValueError(f"min_lung_focus_lift={min_lung_focus_lift} must be a finite number >= 0")
    if min_heatmaps < 1:
        raise ValueError(f"min_heatmaps={min_heatmaps} must be at least 1")
    lung = np.array([s["lung_focus"] for s in scores], dtype=np.float64)
    border = np.array([s["border_share"] for s in scores], dtype=np.float64)
    usable = np.isfinite(lung) & np.isfinite(border)
    n, skipped = int(usable.sum()), int((~usable).sum())
    skipped_note = f" ({skipped} all-zero heatmaps skipped)" if skipped else ""
    if n == 0:
        return AuditResult.undecided(
            f"no usable heatmap among {len(scores)}{skipped_note}: cannot tell where the model looks"
        )
    if n < min_heatmaps:
        return AuditResult.undecided(
            f"only {n} usable heatmaps{skipped_note}, fewer than the {min_heatmaps} the audit needs: too few "
            "to tell where the model looks (evaluate on a larger test split)", n=n
        )
    lifts = np.array([s.get("lung_focus_lift", float("nan")) for s in scores], dtype=np.float64)[usable]
    lift_mean = float(lifts[np.isfinite(lifts)].mean()) if np.isfinite(lifts).any() else float("nan")
    lung_mean = float(lung[usable].mean())
    lung_median = float(np.median(lung[usable]))
    border_mean = float(border[usable].mean())
    over = f"over {n} heatmaps{skipped_note}"
    if lung_mean < min_lung_focus:
        shown, gate_shown = _unequal(lung_mean, min_lung_focus)
        return AuditResult(lung_mean, lung_median, border_mean, n, False, (
            f"mean lung focus {shown} < {gate_shown} {over}: the model looks outside the lungs "
            f"(lift {lift_mean:.2f}x the mask's area share, mean border share {border_mean:.2f}); "
            "check for shortcuts (labels, markers, source differences)"), lift_mean)
    if min_lung_focus_lift > 0 and not math.isfinite(lift_mean):
        return AuditResult(lung_mean, lung_median, border_mean, n, False, (
            f"mean lung focus {lung_mean:.2f} >= {min_lung_focus:.2f} {over}, but no lift could be computed "
            f"(every mask empty) against the gate {min_lung_focus_lift:.2f}x: cannot tell the lungs from chance"),
            lift_mean)
    if lift_mean < min_lung_focus_lift:
        shown, gate_shown = _unequal(lift_mean, min_lung_focus_lift)
        return AuditResult(lung_mean, lung_median, border_mean, n, False, (
            f"mean lung focus {lung_mean:.2f} >= {min_lung_focus:.2f} {over}, but its lift {shown}x < "
            f"{gate_shown}x: the masks cover so much of the image that an even spread scores as "
            f"much, so the evidence is no more on the lungs than chance (mean border share {border_mean:.2f}: in a "
            "lung-cut view the border band holds the lungs' outline and the margin); check what the heatmaps "
            "light up"), lift_mean)
    gate = f" >= {min_lung_focus_lift:.2f}x" if min_lung_focus_lift > 0 else ""
    return AuditResult(lung_mean, lung_median, border_mean, n, True, (
        f"mean lung focus {lung_mean:.2f} >= {min_lung_focus:.2f} {over} "
        f"(lift {lift_mean:.2f}x{gate} the mask's area share)"), lift_mean)


__all__ = [
    "CAM_METHODS",
    "MIN_AUDIT_HEATMAPS",
    "AuditResult",
    "NonFiniteHeatmap",
    "audit",
    "border_band",
    "contour_overlay",
    "estimate_lung_mask",
    "focus_scores",
    "gradcam",
    "last_conv_layer_name",
    "overlay",
]
