"""Resize and enhance grey X-rays (CLAHE, gamma) and masks: pure numpy / OpenCV.

The same ``prepare`` runs in the ``preprocess`` step and inside the served model, so a model always
sees exactly the preprocessing it was trained with.
"""

from __future__ import annotations

import threading
from functools import lru_cache

import cv2
import numpy as np

from cxrexp.config import ENHANCE_METHODS, ImageSpec

# --------------------------------------------------------------------------------------------
# Resize and enhance
# --------------------------------------------------------------------------------------------


def require_grey_uint8(img: np.ndarray, what: str) -> None:
    if img.ndim != 2 or img.dtype != np.uint8:
        raise ValueError(
            f"{what} needs a uint8 HxW grey image, got dtype={img.dtype} shape={img.shape}; "
            "decode with decode_grey() first"
        )


def resize(img: np.ndarray, size: int) -> np.ndarray:
    """uint8 (size, size) from uint8 HxW; non-square inputs are stretched, not padded."""
    return resize_to(img, (size, size))


def resize_to(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """uint8 ``shape`` = (h, w) from uint8 HxW.

    Area averaging when shrinking (no aliasing of rib edges and noise), bilinear when enlarging
    (area interpolation degenerates to nearest-neighbour blocks there).
    """
    require_grey_uint8(img, "resize")
    height, width = int(shape[0]), int(shape[1])
    if height < 1 or width < 1:
        raise ValueError(f"resize: size={height}x{width} must be a positive number of pixels")
    shrinking = height < img.shape[0] or width < img.shape[1]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(img, (width, height), interpolation=interpolation)


def gamma_lut(gamma: float) -> np.ndarray:
    """uint8[256] lookup table ``round(255 * (i / 255) ** gamma)``; gamma < 1 brightens."""
    if not gamma > 0:
        raise ValueError(f"gamma={gamma} must be positive")
    levels = np.arange(256, dtype=np.float64) / 255.0
    return np.clip(np.rint(255.0 * levels**gamma), 0, 255).astype(np.uint8)


def apply_lut(img: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """uint8 HxW: each pixel replaced by ``lut[pixel]``."""
    return cv2.LUT(img, lut)


def apply_clahe(img: np.ndarray, clahe: cv2.CLAHE) -> np.ndarray:
    """uint8 HxW: contrast-limited adaptive histogram equalisation with a ready CLAHE object."""
    return clahe.apply(img)


class Enhancer:
    """The enhancement an ImageSpec asks for, with its settings fixed at construction.

    Calling it is a pure function of the image. Build through ``enhancer_for(spec)`` so the LUT
    and CLAHE settings are made once per spec, not once per image.
    """

    def __init__(self, method: str, *, clip_limit: float = 2.0, tile_grid: int = 8, gamma: float = 1.0) -> None:
        if method not in ENHANCE_METHODS:
            raise ValueError(f"enhance={method!r} is not one of {ENHANCE_METHODS}")
        self.method = method
        self.clip_limit = float(clip_limit)
        self.tile_grid = int(tile_grid)
        self.gamma = float(gamma)
        self._lut = gamma_lut(self.gamma) if method == "gamma" else None
        # A CLAHE object keeps scratch buffers between calls, so each thread gets its own.
        self._local = threading.local()

    @classmethod
    def from_spec(cls, spec: ImageSpec) -> Enhancer:
        return cls(spec.enhance, clip_limit=spec.clip_limit, tile_grid=spec.tile_grid, gamma=spec.gamma)

    def _clahe(self) -> cv2.CLAHE:
        clahe = getattr(self._local, "clahe", None)
        if clahe is None:
            clahe = cv2.createCLAHE(clipLimit=self.clip_limit, tileGridSize=(self.tile_grid, self.tile_grid))
            self._local.clahe = clahe
        return clahe

    def __call__(self, img: np.ndarray) -> np.ndarray:
        require_grey_uint8(img, "enhance")
        if self.method == "clahe":
            return apply_clahe(img, self._clahe())
        if self.method == "gamma":
            return apply_lut(img, self._lut)
        return img.copy()

    def __repr__(self) -> str:
        return (
            f"Enhancer({self.method!r}, clip_limit={self.clip_limit}, tile_grid={self.tile_grid}, "
            f"gamma={self.gamma})"
        )


@lru_cache(maxsize=32)
def enhancer_for(spec: ImageSpec) -> Enhancer:
    """The (cached) Enhancer for a spec; ImageSpec is frozen, hence hashable."""
    return Enhancer.from_spec(spec)


def enhance(img: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """uint8 HxW -> uint8 HxW: CLAHE, gamma or a copy, as ``spec.enhance`` says."""
    return enhancer_for(spec)(img)


def prepare(grey: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """uint8 HxW decoded grey -> uint8 (S, S) model input, S = ``spec.image_size``.

    The one function both the ``preprocess`` step and the served model call. Resize comes first:
    enhancing a 4000x4000 original costs ~100x more than enhancing the 128x128 result, and CLAHE's
    tile grid is then relative to what the model sees, so one spec means the same contrast on
    every source resolution.
    """
    require_grey_uint8(grey, "prepare")
    return enhance(resize(grey, spec.image_size), spec)


def lung_pixels(mask: np.ndarray) -> np.ndarray:
    """bool HxW: which pixels of a uint8 lung mask are lung.

    The one rule for every mask cxrexp reads: 0/255 masks (Kaggle) are thresholded at 128 to absorb
    JPEG noise; masks already in {0, 1} are read as they are.
    """
    require_grey_uint8(mask, "lung_pixels")
    return mask > 0 if int(mask.max(initial=0)) <= 1 else mask >= 128


def mask_at(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """uint8 HxW lung mask -> uint8 ``shape`` = (h, w) in {0, 1}.

    Resizing the 0/255 version and thresholding at half keeps a pixel when at least half its area
    was lung, so thin borders neither grow nor vanish.
    """
    scaled = resize_to(lung_pixels(mask).astype(np.uint8) * 255, shape)
    return (scaled >= 128).astype(np.uint8)


def prepare_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """uint8 HxW lung mask -> uint8 (size, size) in {0, 1} (``mask_at`` a square)."""
    return mask_at(mask, (size, size))


