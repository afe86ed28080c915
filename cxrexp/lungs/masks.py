"""Lung masks after segmentation: clean-up, plausibility, the crop box and the lung view (pure).

Arrays in, arrays and dataclasses out; NumPy and OpenCV only. A mask here is ``bool HxW`` (True on
lung) at the size of the image it belongs to: a mask of another size is resized to its image first
(``mask_for_image``), never the image to the mask, and thresholded after resizing.

The crop a classifier is trained on (``lung_view``) is the bounding box of the two largest mask
components (both lungs) widened by a margin, made square by padding (or left to the resize to
stretch), optionally with everything outside the widened mask set to a constant. A mask that is
not plausible (empty, one lung, an area outside the documented range) is not trusted: the view falls
back to the whole image and says why, so the caller can count and report fallbacks per class.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from cxrexp.config import LUNG_ASPECTS as ASPECTS
from cxrexp.config import LUNG_MODES

# Share of the image both lungs cover. The dataset masks of the shared sets (cxr-masks 600, lung-seg-nlm
# 300) span 0.084-0.451 (1st-99th percentile 0.127-0.398; docs/lungs.md): outside 0.08-0.60 the mask is
# wrong, not the patient.
MIN_LUNG_AREA = 0.08
MAX_LUNG_AREA = 0.60
# The smaller lung is at least this share of the larger. In the same 900 dataset masks the smallest
# share is 0.10 (one Shenzhen TB film), the 1st percentile 0.39-0.46: 0.15 flags that one film and a
# segmenter that found one lung, or a blob of text, while keeping every other dataset mask.
MIN_SECOND_LUNG = 0.15


@dataclass(frozen=True)
class MaskCheck:
    """What a mask says about the lungs: ``plausible`` and, when not, ``reason``; ``area`` in [0, 1]."""

    plausible: bool
    reason: str
    area: float
    components: int


@dataclass(frozen=True)
class LungView:
    """The image a classifier sees: ``image`` uint8 (h, w); ``applied`` False when the mask was not
    trusted (``reason`` says why, the image is then the whole input); ``box`` (y0, y1, x0, x1) in
    input pixels; ``area``: the mask's share of the input."""

    image: np.ndarray
    applied: bool
    reason: str
    box: tuple[int, int, int, int]
    area: float


def binarise(mask: np.ndarray, threshold: int = 127) -> np.ndarray:
    """bool HxW from a uint8/uint16/bool mask, HxW or HxWxC (any channel lit counts): value > threshold."""
    arr = np.asarray(mask)
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    if arr.ndim != 2:
        raise ValueError(f"a mask must be HxW or HxWxC, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr.copy()
    if arr.dtype == np.uint16:
        return arr > threshold * 257
    return arr > threshold


def mask_for_image(mask: np.ndarray, image_shape: tuple[int, int], threshold: int = 127) -> np.ndarray:
    """The mask resized to its image (``image_shape`` = (h, w)) and thresholded after resizing: bool HxW."""
    arr = np.asarray(mask)
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint16:
        arr = (arr >> 8).astype(np.uint8)
    if arr.shape != tuple(image_shape):
        arr = cv2.resize(arr, (image_shape[1], image_shape[0]), interpolation=cv2.INTER_LINEAR)
    return arr > threshold


@dataclass(frozen=True)
class _Components:
    """One labelling of a mask: the ``keep`` largest 8-connected components (labels, largest first)
    with their areas and bounding boxes, from ``cv2.connectedComponentsWithStats`` (computed once per
    mask: preprocess labels every image's mask, and this was its largest cost after the segmenter)."""

    labels: np.ndarray
    order: np.ndarray
    stats: np.ndarray

    @classmethod
    def of(cls, mask: np.ndarray, keep: int = 2) -> _Components:
        _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
        order = np.argsort(-stats[1:, cv2.CC_STAT_AREA], kind="stable")[:keep] + 1
        return cls(labels, order, stats)

    @property
    def areas(self) -> list[int]:
        return [int(a) for a in self.stats[self.order, cv2.CC_STAT_AREA]]

    def kept(self) -> np.ndarray:
        """bool mask of the kept components (a lookup table over the labels)."""
        keep = np.zeros(len(self.stats), dtype=bool)
        keep[self.order] = True
        return keep[self.labels]

    def box(self) -> tuple[int, int, int, int]:
        """(y0, y1, x0, x1), half-open, of the kept components' pixels; ValueError if there are none."""
        if not self.order.size:
            raise ValueError("crop_box of an empty mask")
        rows = self.stats[self.order]
        x0, y0 = rows[:, cv2.CC_STAT_LEFT].min(), rows[:, cv2.CC_STAT_TOP].min()
        x1 = (rows[:, cv2.CC_STAT_LEFT] + rows[:, cv2.CC_STAT_WIDTH]).max()
        y1 = (rows[:, cv2.CC_STAT_TOP] + rows[:, cv2.CC_STAT_HEIGHT]).max()
        return int(y0), int(y1), int(x0), int(x1)


def largest_components(mask: np.ndarray, keep: int = 2) -> tuple[np.ndarray, list[int]]:
    """(the ``keep`` largest 8-connected components of a bool mask, their areas largest first)."""
    parts = _Components.of(mask, keep)
    return parts.kept(), parts.areas


def _check(parts: _Components, size: int, min_area: float, max_area: float, min_second: float) -> MaskCheck:
    areas = parts.areas
    area = float(sum(areas)) / max(size, 1)
    if not areas:
        return MaskCheck(False, "empty mask", 0.0, 0)
    if area < min_area or area > max_area:
        return MaskCheck(False, f"lung area {area:.2f} outside [{min_area:.2f}, {max_area:.2f}]", area, len(areas))
    if len(areas) < 2 or areas[1] < min_second * areas[0]:
        second = areas[1] / areas[0] if len(areas) > 1 else 0.0
        return MaskCheck(False, f"one lung found (second component {second:.2f} of the first, "
                                f"minimum {min_second:.2f})", area, len(areas))
    return MaskCheck(True, "", area, len(areas))


def check_mask(mask: np.ndarray, *, min_area: float = MIN_LUNG_AREA, max_area: float = MAX_LUNG_AREA,
               min_second: float = MIN_SECOND_LUNG) -> MaskCheck:
    """Is ``mask`` (bool HxW, both lungs) plausible? Area is that of the two largest components."""
    return _check(_Components.of(mask), mask.size, min_area, max_area, min_second)


def _widen_box(box: tuple[int, int, int, int], shape: tuple[int, ...], margin: float) -> tuple[int, int, int, int]:
    y0, y1, x0, x1 = box
    dy, dx = round((y1 - y0) * margin), round((x1 - x0) * margin)
    h, w = shape[:2]
    return max(0, y0 - dy), min(h, y1 + dy), max(0, x0 - dx), min(w, x1 + dx)


def crop_box(mask: np.ndarray, margin: float) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1), half-open, of the mask's True pixels widened by ``margin`` x the box's own
    height/width on each side, clipped to the image. ValueError on an empty mask."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise ValueError("crop_box of an empty mask")
    return _widen_box((int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1), mask.shape, margin)


def crop(image: np.ndarray, box: tuple[int, int, int, int], aspect: str, fill: int) -> np.ndarray:
    """The box of ``image`` (uint8 HxW); ``aspect="pad"`` pads the shorter side with ``fill`` to a
    square, centred (so a later square resize does not distort the lungs); ``"stretch"`` leaves it."""
    if aspect not in ASPECTS:
        raise ValueError(f"aspect={aspect!r} is not one of {ASPECTS}")
    y0, y1, x0, x1 = box
    part = image[y0:y1, x0:x1]
    if aspect == "stretch" or part.shape[0] == part.shape[1]:
        return np.ascontiguousarray(part)
    side = max(part.shape)
    out = np.full((side, side), fill, dtype=image.dtype)
    top, left = (side - part.shape[0]) // 2, (side - part.shape[1]) // 2
    out[top:top + part.shape[0], left:left + part.shape[1]] = part
    return out


def widen(mask: np.ndarray, pixels: int) -> np.ndarray:
    """bool mask dilated by ``pixels`` (a (2p+1)-square kernel); ``pixels <= 0`` returns a copy."""
    if pixels <= 0:
        return mask.copy()
    kernel = np.ones((2 * pixels + 1, 2 * pixels + 1), np.uint8)
    return cv2.dilate(mask.astype(np.uint8), kernel) > 0


def lung_view(image: np.ndarray, mask: np.ndarray, mode: str, *, margin: float, fill: int, aspect: str,
              min_area: float = MIN_LUNG_AREA, max_area: float = MAX_LUNG_AREA) -> LungView:
    """What the classifier sees of ``image`` (uint8 HxW) given its lung ``mask`` (bool HxW, same size).

    ``mode``: ``none`` (the whole image), ``crop`` (the widened lung box), ``mask`` (the box, with
    everything outside the mask widened by ``margin`` x the box size set to ``fill``). An implausible
    mask gives the whole image with ``applied=False`` and the reason.
    """
    if mode not in LUNG_MODES:
        raise ValueError(f"lungs={mode!r} is not one of {LUNG_MODES}")
    if image.shape != mask.shape:
        raise ValueError(f"image {image.shape} and mask {mask.shape} differ in size: use mask_for_image first")
    h, w = image.shape
    whole = (0, h, 0, w)
    if mode == "none":
        return LungView(image, False, "lungs=none", whole, float("nan"))
    parts = _Components.of(mask)
    check = _check(parts, mask.size, min_area, max_area, MIN_SECOND_LUNG)
    if not check.plausible:
        return LungView(image, False, check.reason, whole, check.area)
    box = _widen_box(parts.box(), mask.shape, margin)  # == crop_box(parts.kept(), margin)
    source = image
    if mode == "mask":
        pixels = round(max(box[1] - box[0], box[3] - box[2]) * margin)
        source = np.where(widen(parts.kept(), pixels), image, np.uint8(fill)).astype(image.dtype)
    return LungView(crop(source, box, aspect, fill), True, "", box, check.area)


def overlay(image: np.ndarray, predicted: np.ndarray, truth: np.ndarray | None = None) -> np.ndarray:
    """uint8 RGB (h, w, 3): the grey image with the predicted mask's outline in yellow and, when given,
    the true mask's outline in green (for the held-out figure)."""
    rgb = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    for mask, colour in ((truth, (0, 255, 0)), (predicted, (255, 255, 0))):
        if mask is None:
            continue
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(rgb, contours, -1, colour, max(1, image.shape[0] // 128))
    return rgb


def dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Dice overlap of two bool masks in [0, 1]; 1.0 when both are empty (nothing to find, nothing found)."""
    total = int(predicted.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(predicted, truth).sum()) / total


def iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two bool masks in [0, 1]; 1.0 when both are empty."""
    union = int(np.logical_or(predicted, truth).sum())
    return 1.0 if union == 0 else float(np.logical_and(predicted, truth).sum()) / union


__all__ = [
    "ASPECTS",
    "LUNG_MODES",
    "MAX_LUNG_AREA",
    "MIN_LUNG_AREA",
    "MIN_SECOND_LUNG",
    "LungView",
    "MaskCheck",
    "binarise",
    "check_mask",
    "crop",
    "crop_box",
    "dice",
    "iou",
    "largest_components",
    "lung_view",
    "mask_for_image",
    "overlay",
    "widen",
]
