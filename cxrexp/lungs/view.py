"""The lung view of one X-ray, the same in preprocess and in the served model (pure).

Three steps, with the segmenter's forward pass between the first and the second:

1. ``working_image(grey, spec)``: the decoded grey image shrunk so its longer side is at most
   ``working_size(spec)`` (aspect kept). The segmenter sees this image, its mask is resized to it,
   and the crop is cut from it: a fixed working size makes the crop cost the same for a 4,000 px
   film as for a 300 px one, and makes training and serving cut from identical pixels.
2. The segmenter (``lungs.segmenter.predict_masks``) gives a bool mask at the working image's size.
3. ``finish(working, mask, spec)``: ``masks.lung_view`` (crop, or crop and fill outside the widened
   mask; the whole image when the mask is implausible), then ``transforms.prepare`` (resize to S,
   enhance). Returns the uint8 (S, S) model input and the ``LungView`` saying what was done.

``view_mask`` applies the same box to another mask (the dataset's own), so the audit scores the
stored image against a mask that lines up with it.
"""

from __future__ import annotations

import cv2
import numpy as np

from cxrexp.config import ImageSpec
from cxrexp.images.transforms import prepare, prepare_mask, require_grey_uint8
from cxrexp.lungs.masks import LungView, crop, lung_view

# The working image is at least this many pixels on its longer side, and at least twice the model's
# input: the crop (about 70% of each side) is then still larger than S, so it is shrunk, never enlarged.
MIN_WORKING_SIZE = 256


def working_size(spec: ImageSpec) -> int:
    """Longer side, in pixels, of the image the segmenter sees and the crop is cut from."""
    return max(MIN_WORKING_SIZE, 2 * spec.image_size)


def working_image(grey: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """uint8 HxW decoded grey -> uint8 hxw with max(h, w) <= ``working_size(spec)``, aspect kept
    (area interpolation); an image already that small is returned as it is (never enlarged)."""
    require_grey_uint8(grey, "working_image")
    side = working_size(spec)
    height, width = grey.shape
    scale = side / max(height, width)
    if scale >= 1:
        return grey
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(grey, size, interpolation=cv2.INTER_AREA)


def finish(working: np.ndarray, mask: np.ndarray, spec: ImageSpec) -> tuple[np.ndarray, LungView]:
    """(uint8 (S, S) model input, the LungView) from the working image and its bool lung mask
    (same size). With ``spec.lungs == "none"`` the mask is ignored and the whole image prepared."""
    view = lung_view(working, mask, spec.lungs, margin=spec.lung_margin, fill=spec.lung_fill,
                     aspect=spec.lung_aspect)
    return prepare(view.image, spec), view


def view_mask(mask: np.ndarray, view: LungView, spec: ImageSpec) -> np.ndarray:
    """Another bool mask at the working image's size, cut with ``view``'s box and padded as the image
    was -> uint8 (S, S) in {0, 1}, aligned with ``finish``'s image."""
    part = crop(mask.astype(np.uint8) * 255, view.box, spec.lung_aspect, 0) if view.applied else mask.astype(np.uint8) * 255
    return prepare_mask(part, spec.image_size)


__all__ = ["MIN_WORKING_SIZE", "finish", "view_mask", "working_image", "working_size"]
