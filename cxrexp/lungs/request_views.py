"""Request rows through the lung view: the served model's pure half for models trained on lung crops.

``request_images`` decodes a request cell; here each decoded image goes through the same three
steps as in preprocess (``lungs.view``: working image, segmenter, crop and prepare), with the
segmenter's forward pass passed in as a function (the model's own U-Net; no Keras here).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd

from cxrexp.images.request_images import (
    DECODE_WORKERS,
    PREDICT_CHUNK,
    Deadline,
    RowRejected,
    ServingSpec,
    check_deadline,
    check_request,
    decode_row,
    reject,
)
from cxrexp.lungs.view import finish, working_image


@dataclass(frozen=True)
class LungRows:
    """A request's rows through the lung view: ``pixels`` float32 (N, S, S, 1) in [0, 1]; ``applied``
    bool (N,), whether each row's crop was applied (False: its mask was implausible, the whole image
    was used); ``area`` float64 (N,), the mask's share of the image."""

    pixels: np.ndarray
    applied: np.ndarray
    area: np.ndarray


def _working_row(value: Any, spec: ServingSpec) -> np.ndarray:
    return working_image(decode_row(value, spec.max_bytes, spec.max_pixels), spec.image_spec)


def prepare_lung_rows(images: pd.Series | list[Any], spec: ServingSpec,
                      lung_masks: Callable[[list[np.ndarray]], list[np.ndarray]], *,
                      chunk_rows: int = PREDICT_CHUNK, workers: int | None = None,
                      deadline: Deadline | None = None) -> LungRows:
    """Request cells -> the lung views training made of the same files (``lungs.view``): decode and
    shrink to the working size (in up to ``workers`` threads), segment ``chunk_rows`` at a time with
    ``lung_masks`` (the model's own segmenter), crop, prepare. Every bad row is listed in one
    ``RequestRejected`` before any row is segmented. Past ``deadline`` (checked before each row and
    each segmenter chunk) it raises ``RequestTimedOut``."""
    values = check_request(list(images), spec.limits)
    n_workers = max(1, min(len(values), DECODE_WORKERS if workers is None else workers))
    working: list[np.ndarray | None] = [None] * len(values)

    def one(row: int) -> str | None:
        check_deadline(deadline)
        try:
            working[row] = _working_row(values[row], spec)
        except RowRejected as exc:
            return exc.reason
        return None

    if n_workers > 1:
        with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="cxrexp-decode") as pool:
            reasons = list(pool.map(one, range(len(values))))
    else:
        reasons = [one(row) for row in range(len(values))]
    errors = [f"row {row}: {reason}" for row, reason in enumerate(reasons) if reason is not None]
    if errors:
        raise reject(errors, len(values))
    size = spec.image_spec.image_size
    pixels = np.empty((len(values), size, size), dtype=np.uint8)
    applied = np.zeros(len(values), dtype=bool)
    area = np.full(len(values), np.nan)
    for start in range(0, len(values), chunk_rows):
        check_deadline(deadline)
        batch = working[start:start + chunk_rows]
        for offset, (image, mask) in enumerate(zip(batch, lung_masks(batch))):
            pixels[start + offset], view = finish(image, mask, spec.image_spec)
            applied[start + offset], area[start + offset] = view.applied, view.area
    # The same float32 division as the training pipeline's x / 255.
    return LungRows(pixels.astype(np.float32)[..., None] / np.float32(255.0), applied, area)


__all__ = ["LungRows", "prepare_lung_rows"]
