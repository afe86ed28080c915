"""Perceptual hashes of grey X-rays, for near-duplicate detection (pure)."""

from __future__ import annotations

import cv2
import imagehash
import numpy as np
from PIL import Image

from cxrexp.images.transforms import require_grey_uint8

# 16x16 = 256 bits. Chest X-rays all look alike to a 64-bit phash: on real images (cxr-mini) 64-bit
# hashes put different patients within 4 bits of each other, while at 256 bits the true near-duplicates
# (the same film re-exported, or with arrows and a date burned in) sit at <= 40 and different films at
# >= 52 (docs/usage.md).
PHASH_SIZE = 16
PHASH_BITS = PHASH_SIZE * PHASH_SIZE


def perceptual_hash(grey: np.ndarray) -> int:
    """256-bit DCT perceptual hash (imagehash.phash, hash_size 16) of a uint8 HxW image.

    A python int in [0, 2**256). Near-duplicates (re-encoded, rescaled, annotated) differ in few bits.
    """
    require_grey_uint8(grey, "perceptual_hash")
    # imagehash shrinks to 4x the hash size with PIL's Lanczos filter before its DCT; doing that shrink
    # with OpenCV's area filter first costs a third of the time and moves real X-rays' hashes by a few
    # bits of 256 (same near-duplicate pairs on cxr-mini).
    side = PHASH_SIZE * 4
    small = cv2.resize(grey, (side, side), interpolation=cv2.INTER_AREA) if grey.shape != (side, side) else grey
    bits = imagehash.phash(Image.fromarray(small), hash_size=PHASH_SIZE).hash.flatten()
    # First bit most significant, as imagehash prints it; packbits is 70x faster than a Python loop.
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


