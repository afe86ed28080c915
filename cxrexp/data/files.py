"""One source file as the preprocess pipeline needs it: read, check, hash, prepare (pure, reads only)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from cxrexp.config import ImageSpec
from cxrexp.images.decode import (
    DEFAULT_MIN_SIDE,
    ImageRejected,
    decode_file,
    max_file_bytes,
    read_bytes,
    read_grey,
)
from cxrexp.images.hashing import perceptual_hash
from cxrexp.images.transforms import mask_at, prepare, prepare_mask
from cxrexp.lungs.view import working_image

# --------------------------------------------------------------------------------------------
# One file, as the preprocess pipeline needs it
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessedImage:
    """One source image ready for the prepared dataset.

    image: uint8 (S, S) after ``prepare``; mask: uint8 (S, S) in {0, 1} or None (no mask, or the
    mask could not be read: ``mask_problem`` then says why). With a lung view (``spec.lungs`` other
    than ``none``) both are instead at the working size (``lungs.view.working_image``): the image
    not yet cropped or enhanced, the mask resized to it; the caller segments, crops and prepares. sha256: hex digest of the file bytes;
    phash: 256-bit perceptual hash of the decoded grey before enhancement; width/height: decoded
    size in pixels.
    """

    image: np.ndarray
    mask: np.ndarray | None
    sha256: str
    phash: int
    width: int
    height: int
    mask_problem: str | None = None


def process_file(path: str, mask_path: str | None, spec: ImageSpec, max_pixels: int) -> ProcessedImage:
    """Read, check, hash and prepare one image (and its mask) from disk.

    Top-level and argument-picklable so a multiprocessing pool can map it. Raises ImageRejected
    (with the path) when the image itself is unusable; a mask that fails to read only sets
    ``mask=None`` and ``mask_problem``, because the image is still good for training.
    """
    data = read_bytes(path, max_bytes=max_file_bytes(max_pixels))
    sha256 = hashlib.sha256(data).hexdigest()
    grey = decode_file(data, path, max_pixels=max_pixels, min_side=DEFAULT_MIN_SIDE)
    height, width = grey.shape
    mask_grey = None
    mask_problem = None
    if mask_path:
        try:
            # Any size is fine for a mask: it is resized to its image.
            mask_grey = read_grey(mask_path, max_pixels=max_pixels, min_side=1)
        except ImageRejected as err:
            mask_problem = err.reason
    image, mask = prepare_pair(grey, mask_grey, spec)
    return ProcessedImage(
        image=image,
        mask=mask,
        sha256=sha256,
        phash=perceptual_hash(grey),
        width=int(width),
        height=int(height),
        mask_problem=mask_problem,
    )


def prepare_pair(grey: np.ndarray, mask_grey: np.ndarray | None, spec: ImageSpec) -> tuple[np.ndarray, np.ndarray | None]:
    """The decoded image and its mask (uint8 any size, or None) as ``ProcessedImage`` holds them:
    prepared at S, or, with a lung view, at the working size for the caller to segment and crop."""
    if spec.lungs == "none":
        return prepare(grey, spec), None if mask_grey is None else prepare_mask(mask_grey, spec.image_size)
    working = working_image(grey, spec)
    if mask_grey is None:
        return working, None
    return working, mask_at(mask_grey, working.shape)


__all__ = ["ProcessedImage", "prepare_pair", "process_file"]
