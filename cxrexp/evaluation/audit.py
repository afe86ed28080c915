"""Which test cases the evaluate step shows and audits, and the shortcut audit itself (no MLflow).

The pure half of ``cxrexp/steps/evaluate_step.py``: arrays, data frames and a loaded model in,
arrays and dataclasses out. The step logs what these return.

- Fit: ``spec_mismatches`` names the image settings in which a dataset differs from the model's.
- Sampling: ``confusion_cells`` labels each test case TP/FP/TN/FN; ``sample_order`` ranks the test
  split with a seeded permutation; ``pick_per_cell`` (gallery) and ``audit_sample`` (audit) take the
  highest-ranked cases, so the same dataset and seed show the same images for every model.
- The audit: HiResCAM heatmaps (``gradcam.gradcam``) reduced to their salient region, scored against
  the lung mask widened by one cell of the explained feature map (``gradcam.focus_scores``); the mean
  lung focus of the cases called positive is gated (``gradcam.audit``). Why each choice: docs/evaluate.md.

``cxrexp.gradcam`` (TensorFlow) and OpenCV are imported inside the functions that need them, so
importing this module, and with it the evaluate step, loads neither: a bad flag fails in a moment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from cxrexp.config import MIN_AUDIT_HEATMAPS, ImageSpec
from cxrexp.data.store import PreparedDataset

CELLS = ("TP", "FP", "TN", "FN")
# Grad-CAM audit sample: enough heatmaps for a stable mean, few enough to stay seconds on a CPU.
AUDIT_SAMPLE = 64
AUDIT_CONTEXT = 16  # cases called negative, scored for the reader but not gated
# Overlays are upscaled (nearest neighbour for the image, so its pixels stay the ones the model saw)
# to at least this side, or a 48 px overlay is a smudge in the report.
DISPLAY_MIN_SIDE = 256
# Heatmaps for the gallery and the audit: HiResCAM, the Grad-CAM variant that stays faithful with
# build_cnn's Flatten + Dense head (plain Grad-CAM averages the gradient over positions and smeared a
# marker-trained model's evidence over the lungs; see docs/evaluate.md).
CAM_METHOD = "hirescam"
# Audit scoring (see docs/evaluate.md, "The shortcut audit"):
# only heatmap values >= this fraction of the image's peak count (the region the 0.5 contour
# encloses), so the diffuse low-level floor Grad-CAM leaves everywhere does not drown the peaks;
SALIENT_LEVEL = 0.5
# and the lung mask is widened by one cell of the explained feature map: a heatmap upsampled from
# an (S/k)x(S/k) map cannot place mass more precisely than k pixels.
MASK_TOLERANCE_CELLS = 1


# --------------------------------------------------------------------------------------------------
# Does the data fit the model?


def spec_mismatches(model_spec: ImageSpec, data_spec: ImageSpec) -> list[str]:
    """Differences that change the pixels the model sees, as ``"field: model X, data Y"``.

    ``image_size`` and ``enhance`` always count; ``clip_limit``/``tile_grid`` only when both use
    CLAHE and ``gamma`` only when both use gamma (a different gamma cannot change a CLAHE image).
    """
    names = ["image_size", "enhance"]
    if model_spec.enhance == data_spec.enhance == "clahe":
        names += ["clip_limit", "tile_grid"]
    if model_spec.enhance == data_spec.enhance == "gamma":
        names.append("gamma")
    return [
        f"{name}: model {getattr(model_spec, name)!r}, data {getattr(data_spec, name)!r}"
        for name in names
        if getattr(model_spec, name) != getattr(data_spec, name)
    ]


# --------------------------------------------------------------------------------------------------
# Which cases are shown and audited


def confusion_cells(labels: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """labels int (N,) in {0, 1}, predicted bool/int (N,) -> object (N,) of "TP"/"FP"/"TN"/"FN"."""
    labels = np.asarray(labels).astype(bool)
    predicted = np.asarray(predicted).astype(bool)
    if labels.shape != predicted.shape:
        raise ValueError(f"labels {labels.shape} and predicted {predicted.shape} differ in shape")
    return np.where(predicted, np.where(labels, "TP", "FP"), np.where(labels, "FN", "TN")).astype(object)


def sample_order(n: int, seed: int) -> np.ndarray:
    """A seeded permutation of 0..n-1: the order in which test cases are picked for Grad-CAM.

    The caller sorts the test split by manifest ``source`` first, so the same dataset and seed give
    the same ranking of images for every model and run: each confusion cell (and the audit) takes its
    highest-ranked cases, so two models differ in the images shown only where their calls differ.
    """
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    return np.random.default_rng([int(seed), 0x6CA3]).permutation(n)


def pick_per_cell(cells: Sequence[str], order: np.ndarray, per_cell: int) -> dict[str, np.ndarray]:
    """For each of TP/FP/TN/FN the first ``per_cell`` positions of ``order`` in that cell (int64)."""
    cells_arr = np.asarray(cells, dtype=object)
    order = np.asarray(order, dtype=np.int64)
    return {cell: order[cells_arr[order] == cell][: max(per_cell, 0)] for cell in CELLS}


def audit_sample(cells: Sequence[str], order: np.ndarray, n_gated: int = AUDIT_SAMPLE,
                 n_context: int = AUDIT_CONTEXT) -> tuple[np.ndarray, np.ndarray]:
    """(gated, context) positions for the audit, both in ``order``.

    gated: the first ``n_gated`` cases the model calls positive (TP, FP): Grad-CAM explains the
    positive logit, so these are the heatmaps that say where the model finds its evidence.
    context: the first ``n_context`` cases it calls negative (TN, FN), scored and logged for the
    reader but left out of the verdict (their positive-class maps are weak and diffuse whatever the
    model learnt; see docs/evaluate.md).
    """
    cells_arr = np.asarray(cells, dtype=object)
    order = np.asarray(order, dtype=np.int64)
    called_positive = np.isin(cells_arr[order], ("TP", "FP"))
    return order[called_positive][: max(n_gated, 0)], order[~called_positive][: max(n_context, 0)]


def display_pair(image: np.ndarray, heatmap: np.ndarray, min_side: int = DISPLAY_MIN_SIDE) -> tuple[np.ndarray, np.ndarray]:
    """Upscale uint8 (S, S) and heatmap (S, S) by an integer factor to at least ``min_side`` pixels.

    The image is repeated (nearest neighbour: exactly the pixels the model saw, only bigger); the
    heatmap is interpolated linearly, as Grad-CAM upsampling already is.
    """
    import cv2

    factor = max(1, math.ceil(min_side / image.shape[0]))
    if factor == 1:
        return image, heatmap
    side = image.shape[0] * factor
    big_image = np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)
    big_heat = cv2.resize(np.asarray(heatmap, np.float32), (side, side), interpolation=cv2.INTER_LINEAR)
    return big_image, np.clip(big_heat, 0.0, 1.0)


# --------------------------------------------------------------------------------------------------
# The shortcut audit


def salient(heatmaps: np.ndarray, level: float = SALIENT_LEVEL) -> np.ndarray:
    """float (B, S, S) in [0, 1] -> the same with values below ``level`` (of each map's peak 1) set to 0."""
    heatmaps = np.asarray(heatmaps, dtype=np.float32)
    if not 0 <= level < 1:
        raise ValueError(f"level={level} must be in [0, 1)")
    return np.where(heatmaps >= level, heatmaps, 0.0).astype(np.float32)


def widen_masks(masks: np.ndarray, pixels: int) -> np.ndarray:
    """uint8 (B, S, S) in {0, 1} dilated by a disc of radius ``pixels`` (0: unchanged)."""
    import cv2

    masks = np.asarray(masks, dtype=np.uint8)
    if pixels <= 0:
        return masks
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pixels + 1, 2 * pixels + 1))
    return np.stack([cv2.dilate(mask, kernel) for mask in masks]) if len(masks) else masks


def feature_stride(model: Any, conv_layer: str | None = None) -> int:
    """Input pixels per cell of the explained conv layer's feature map (1 when it cannot be read)."""
    from cxrexp.evaluation import gradcam

    try:
        name = conv_layer or gradcam.last_conv_layer_name(model)
        side = model.get_layer(name).output.shape[1]
        return max(1, int(round(model.inputs[0].shape[1] / side)))
    except (ValueError, TypeError, AttributeError, ZeroDivisionError):
        return 1


@dataclass(frozen=True)
class AuditOutcome:
    """The audit verdict plus the per-image scores behind it.

    result: ``gradcam.AuditResult`` over the gated heatmaps. scores: ``gradcam.focus_scores`` dicts,
    one per heatmap given, in order; gated: bool per score, True where it entered the verdict.
    """

    result: Any
    scores: list[dict]
    gated: np.ndarray
    mask_note: str
    tolerance_px: int


def audit_heatmaps(
    heatmaps: np.ndarray,
    lung_masks: np.ndarray,
    min_lung_focus: float,
    *,
    stride: int,
    gated: np.ndarray | None = None,
    widen: np.ndarray | None = None,
    salient_level: float = SALIENT_LEVEL,
    tolerance_cells: int = MASK_TOLERANCE_CELLS,
    mask_note: str = "",
    min_heatmaps: int = MIN_AUDIT_HEATMAPS,
    min_lung_focus_lift: float = 0.0,
) -> AuditOutcome:
    """Score Grad-CAM heatmaps against lung masks and pass/fail the shortcut audit.

    heatmaps: float (B, S, S) in [0, 1] from ``gradcam.gradcam``; lung_masks: uint8 (B, S, S) in
    {0, 1}; stride: input pixels per cell of the explained feature map; gated: bool (B,), which
    heatmaps the verdict uses (default all); widen: bool (B,), which masks get the tolerance
    (default all; the caller leaves the already generous geometric prior as it is). Each heatmap is
    reduced to its salient region (``salient``) and each widened mask grows by
    ``tolerance_cells * stride`` pixels before ``gradcam.focus_scores``; ``gradcam.audit`` gates
    the mean lung focus and lung-focus lift of the gated ones (over at least ``min_heatmaps``).
    """
    from cxrexp.evaluation import gradcam

    heatmaps = np.asarray(heatmaps)
    lung_masks = np.asarray(lung_masks)
    if heatmaps.shape != lung_masks.shape:
        raise ValueError(f"heatmaps {heatmaps.shape} and lung_masks {lung_masks.shape} must have the same shape")
    gated_arr = np.ones(len(heatmaps), dtype=bool) if gated is None else np.asarray(gated, dtype=bool)
    if gated_arr.shape != (len(heatmaps),):
        raise ValueError(f"gated {gated_arr.shape} must have one flag per heatmap ({len(heatmaps)})")
    widen_arr = np.ones(len(heatmaps), dtype=bool) if widen is None else np.asarray(widen, dtype=bool)
    if widen_arr.shape != (len(heatmaps),):
        raise ValueError(f"widen {widen_arr.shape} must have one flag per mask ({len(heatmaps)})")
    tolerance_px = max(0, int(tolerance_cells) * int(stride))
    widened = np.where(widen_arr[:, None, None], widen_masks(lung_masks, tolerance_px), lung_masks)
    scores = [gradcam.focus_scores(heat, mask) for heat, mask in zip(salient(heatmaps, salient_level), widened)]
    if gated_arr.any():
        result = gradcam.audit([s for s, g in zip(scores, gated_arr) if g], min_lung_focus, int(min_heatmaps),
                               min_lung_focus_lift=min_lung_focus_lift)
    else:
        result = gradcam.AuditResult.undecided(
            f"no audited case is predicted positive (of {len(heatmaps)}): cannot tell where the model "
            "finds positive evidence"
        )
    return AuditOutcome(result, scores, gated_arr, mask_note, tolerance_px)


@dataclass(frozen=True)
class AuditMasks:
    """The lung mask each audited image is scored against, and where it came from."""

    masks: np.ndarray  # uint8 (n, S, S) in {0, 1}
    real: np.ndarray  # bool (n,): a drawn or segmented mask (widened by the tolerance), not the prior
    note: str  # for the reader: how many of each source


def lung_masks(dataset: PreparedDataset, rows: np.ndarray, has_mask: np.ndarray,
               segment: Callable[[list[np.ndarray]], list[np.ndarray]] | None = None,
               segmenter_name: str = "") -> AuditMasks:
    """Real lung masks wherever there are any; the geometric prior only where there are none.

    In order: the mask stored with the image (the dataset's own, or for a lung-view dataset the
    segmenter's at preprocess; manifest ``mask_source`` says which); else ``segment``'s mask of the
    stored image when plausible (``lungs.masks.check_mask``); else ``gradcam.estimate_lung_mask``.
    """
    from cxrexp.evaluation import gradcam
    from cxrexp.lungs.masks import check_mask

    size = dataset.image_size
    stored = dataset.masks()
    images = dataset.images()
    masks = np.empty((len(rows), size, size), dtype=np.uint8)
    prior = gradcam.estimate_lung_mask(np.zeros((size, size), np.uint8))
    real = np.asarray(has_mask, dtype=bool).copy()
    for i, (row, own) in enumerate(zip(rows, real)):
        masks[i] = stored[int(row)] if own else prior
    missing = np.flatnonzero(~real)
    n_segmented = 0
    if segment is not None and missing.size:
        predicted = segment([np.asarray(images[int(rows[i])]) for i in missing])
        for i, mask in zip(missing, predicted):
            if check_mask(np.asarray(mask, dtype=bool)).plausible:
                masks[i], real[i] = np.asarray(mask, dtype=np.uint8), True
                n_segmented += 1
    sources = dataset.manifest["mask_source"].to_numpy() if "mask_source" in dataset.manifest else None
    parts = []
    own = np.asarray(has_mask, dtype=bool)
    if own.any():
        if sources is None:
            parts.append(f"{int(own.sum())} dataset masks")
        else:
            picked = sources[np.asarray(rows, dtype=np.int64)[own]]
            for source in ("dataset", "segmenter"):
                count = int(np.count_nonzero(picked == source))
                if count:
                    parts.append(f"{count} {source} masks" + (" (stored at preprocess)" if source == "segmenter" else ""))
    if n_segmented:
        parts.append(f"{n_segmented} segmented now by {segmenter_name or 'the segmenter'}")
    n_prior = int(np.count_nonzero(~real))
    if n_prior:
        if segment is not None:
            why = f" ({missing.size - n_segmented} segmentations implausible)"
        elif not own.any():
            why = ": no dataset lung masks and no segmenter (train one with -e segment)"
        else:
            why = ""
        parts.append(f"{n_prior} from the geometric prior (gradcam.estimate_lung_mask){why}")
    return AuditMasks(masks, real, "lung masks: " + ", ".join(parts) if parts else "no images audited")


def shortcut_audit(
    model: Any,
    dataset: PreparedDataset,
    test: pd.DataFrame,
    cells: np.ndarray,
    *,
    min_lung_focus: float,
    seed: int,
    batch_size: int = 32,
    segment: Callable[[list[np.ndarray]], list[np.ndarray]] | None = None,
    segmenter_name: str = "",
    min_heatmaps: int = MIN_AUDIT_HEATMAPS,
    min_lung_focus_lift: float = 0.0,
) -> tuple[AuditOutcome, np.ndarray]:
    """The shortcut audit of ``model`` on ``test`` (``evaluate_step.evaluation_frame`` order).

    cells: TP/FP/TN/FN per test row at the operating threshold. segment: a lung segmenter's forward
    pass for images without a stored mask (``lung_masks``). Returns the outcome and the audited
    positions into ``test`` (gated first, then context), aligned with ``outcome.scores``. Raises
    ``gradcam.NonFiniteHeatmap`` when a heatmap is NaN.
    """
    from cxrexp.evaluation import gradcam

    gated, context = audit_sample(cells, sample_order(len(test), seed))
    positions = np.concatenate([gated, context]).astype(np.int64)
    rows = test["row"].to_numpy(np.int64)[positions]
    images = dataset.images()
    pixels = np.stack([np.asarray(images[int(r)]) for r in rows]) if len(rows) else np.zeros(
        (0, dataset.image_size, dataset.image_size), np.uint8)
    heatmaps = gradcam.gradcam(model, pixels.astype(np.float32)[..., None] / 255.0, batch_size=batch_size,
                               method=CAM_METHOD)
    own_mask = test["has_mask"].to_numpy(bool)[positions]
    found = lung_masks(dataset, rows, own_mask, segment, segmenter_name)
    outcome = audit_heatmaps(
        heatmaps, found.masks, min_lung_focus, stride=feature_stride(model),
        gated=np.arange(len(positions)) < len(gated), widen=found.real, mask_note=found.note,
        min_heatmaps=min_heatmaps, min_lung_focus_lift=min_lung_focus_lift,
    )
    return outcome, positions


__all__ = [
    "AUDIT_CONTEXT",
    "AUDIT_SAMPLE",
    "AuditMasks",
    "AuditOutcome",
    "CAM_METHOD",
    "CELLS",
    "DISPLAY_MIN_SIDE",
    "MASK_TOLERANCE_CELLS",
    "SALIENT_LEVEL",
    "audit_heatmaps",
    "audit_sample",
    "confusion_cells",
    "display_pair",
    "feature_stride",
    "lung_masks",
    "pick_per_cell",
    "salient",
    "sample_order",
    "shortcut_audit",
    "spec_mismatches",
    "widen_masks",
]
