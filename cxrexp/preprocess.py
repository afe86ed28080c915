"""Decode, check, resize and enhance chest X-rays: pure numpy / OpenCV / imagecodecs / Pillow.

Everything here works on arrays and bytes; nothing writes files or talks to MLflow. The same
``prepare`` runs in the ``preprocess`` step and inside the served model, so a model always sees
exactly the preprocessing it was trained with.

Bad inputs raise :class:`ImageRejected` with a short ``reason`` that ends up in ``skipped.csv``.
The header is parsed by hand (PNG IHDR, JPEG SOF) and the file's structure is checked (PNG chunk
chain up to IEND, JPEG end-of-image marker) before any pixel is decoded, so a decompression bomb
or a half-downloaded file costs microseconds and the result does not depend on how forgiving the
installed OpenCV build happens to be (older builds half-decode a truncated JPEG without error).
"""

from __future__ import annotations

import hashlib
import io
import struct
import threading
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import imagecodecs
import imagehash
import numpy as np
from PIL import Image

from cxrexp.config import ENHANCE_METHODS, ImageSpec

DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_MIN_SIDE = 32

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8\xff"

# Formats we recognise but do not accept: (offset, magic bytes, name). Naming them lets the
# rejection say "convert it to PNG" instead of the less helpful "not an image".
_OTHER_FORMATS: tuple[tuple[int, bytes, str], ...] = (
    (0, b"GIF87a", "GIF"),
    (0, b"GIF89a", "GIF"),
    (0, b"BM", "BMP"),
    (0, b"II*\x00", "TIFF"),
    (0, b"MM\x00*", "TIFF"),
    (0, b"II+\x00", "TIFF"),  # BigTIFF
    (0, b"MM\x00+", "TIFF"),
    (8, b"WEBP", "WEBP"),
    (128, b"DICM", "DICOM"),
    (0, b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (0, b"\xff\x4f\xff\x51", "JPEG 2000"),
    (4, b"ftypheic", "HEIC"),
    (4, b"ftypheix", "HEIC"),
    (4, b"ftypmif1", "HEIF"),
    (4, b"ftypavif", "AVIF"),
    (0, b"\x00\x00\x01\x00", "ICO"),
    (0, b"8BPS", "PSD"),
    (0, b"%PDF", "PDF"),
)

# JPEG start-of-frame markers carry the image size; C4 (DHT), C8 (JPG) and CC (DAC) share the range.
_JPEG_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
# Markers without a length field: TEM, RST0-7, SOI.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})

_EXIF_ORIENTATION_TAG = 0x0112


class ImageRejected(ValueError):
    """A file that cannot be used as an image; ``reason`` is short and human (``"empty file"``).

    ``str(err)`` adds the path when one is known. Pickles with its reason and path intact, so a
    worker process can raise it back to the pool.
    """

    def __init__(self, reason: str, path: str | None = None) -> None:
        self.reason = reason
        self.path = path
        super().__init__(f"{path}: {reason}" if path else reason)

    def __reduce__(self):
        return (type(self), (self.reason, self.path))


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def sniff_format(data: bytes) -> str | None:
    """``"PNG"``, ``"JPEG"``, the name of another known image format, or None (not an image)."""
    if data.startswith(_PNG_SIGNATURE):
        return "PNG"
    if data.startswith(_JPEG_SIGNATURE):
        return "JPEG"
    for offset, magic, name in _OTHER_FORMATS:
        if data[offset : offset + len(magic)] == magic:
            return name
    return None


def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, which the PNG standard requires to come first."""
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise ImageRejected("truncated or corrupt")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _png_intact(data: bytes) -> bool:
    """True when the chunk chain reaches IEND and every critical chunk's CRC matches.

    Ancillary chunks (lowercase first letter: text, timestamps, ICC profiles) with a bad CRC are
    tolerated, as libpng does: their loss does not change the pixels.
    """
    pos = len(_PNG_SIGNATURE)
    end = len(data)
    while pos + 12 <= end:
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        chunk_type = data[pos + 4 : pos + 8]
        chunk_end = pos + 12 + length
        if chunk_end > end:
            return False
        critical = chunk_type[:1].isupper()
        if critical:
            (stored_crc,) = struct.unpack(">I", data[chunk_end - 4 : chunk_end])
            if zlib.crc32(data[pos + 4 : chunk_end - 4]) != stored_crc:
                return False
        if chunk_type == b"IEND":
            return True
        pos = chunk_end
    return False


def _jpeg_scan(data: bytes) -> tuple[int, int, int]:
    """(width, height, offset of the first scan's data) from the JPEG marker segments."""
    pos = 2  # after SOI
    end = len(data)
    size: tuple[int, int] | None = None
    while pos < end:
        if data[pos] != 0xFF:
            raise ImageRejected("truncated or corrupt")
        while pos < end and data[pos] == 0xFF:  # fill bytes may pad before a marker
            pos += 1
        if pos >= end:
            break
        marker = data[pos]
        pos += 1
        if marker in _JPEG_STANDALONE:
            continue
        if marker == 0xD9:  # EOI before any scan
            break
        if pos + 2 > end:
            break
        (length,) = struct.unpack(">H", data[pos : pos + 2])
        if length < 2 or pos + length > end:
            break
        if marker in _JPEG_SOF_MARKERS and length >= 7:
            height, width = struct.unpack(">HH", data[pos + 3 : pos + 7])
            size = (width, height)
        if marker == 0xDA:  # SOS: entropy-coded data follows the header
            if size is None:
                break
            return size[0], size[1], pos + length
        pos += length
    raise ImageRejected("truncated or corrupt")


def _jpeg_intact(data: bytes, scan_start: int) -> bool:
    """True when an end-of-image marker follows the scan data.

    Byte stuffing (0xFF -> 0xFF 0x00) keeps FF D9 out of entropy-coded data, so its presence after
    the first scan means the file was not cut short; trailing bytes after it are allowed.
    """
    return data.find(b"\xff\xd9", scan_start) >= 0


def _parse_header(data: bytes) -> tuple[str, int, int, int]:
    """(format, width, height, JPEG scan offset or 0) from the header alone."""
    if len(data) == 0:
        raise ImageRejected("empty file")
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageRejected("not an image")
    if fmt == "PNG":
        width, height = _png_size(data)
        return fmt, width, height, 0
    if fmt == "JPEG":
        width, height, scan_start = _jpeg_scan(data)
        return fmt, width, height, scan_start
    raise ImageRejected(f"unsupported format: {fmt}")


def header_size(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) from the header alone, without decoding pixels.

    Raises ImageRejected for empty data, non-images, formats other than PNG/JPEG, and headers
    too short to hold the size.
    """
    fmt, width, height, _ = _parse_header(data)
    return fmt, width, height


def _check_size(width: int, height: int, max_pixels: int, min_side: int) -> None:
    pixels = width * height
    if pixels > max_pixels:
        raise ImageRejected(f"too large: {width}x{height} = {pixels} px (maximum {max_pixels})")
    if width < min_side or height < min_side:
        raise ImageRejected(f"too small: {width}x{height} px (minimum {min_side})")


def _exif_orientation(data: bytes, fmt: str) -> int:
    """EXIF orientation (1..8; 1 = as stored), or 1 when the file carries no EXIF block.

    The byte check keeps Pillow out of the common case: for a PNG without an early eXIf chunk,
    Pillow's getexif() would decode every pixel to look for one.
    """
    marker = b"Exif" if fmt == "JPEG" else b"eXIf"
    if marker not in data[:1 << 20]:
        return 1
    try:
        with Image.open(io.BytesIO(data)) as pil_image:
            return int(pil_image.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except Exception:  # a broken EXIF block must not reject an image whose pixels decode
        return 1


def _apply_orientation(grey: np.ndarray, orientation: int) -> np.ndarray:
    """Undo an EXIF orientation (as Pillow's ImageOps.exif_transpose does) on an HxW array."""
    if orientation == 2:
        return grey[:, ::-1]
    if orientation == 3:
        return grey[::-1, ::-1]
    if orientation == 4:
        return grey[::-1, :]
    if orientation == 5:
        return grey.T
    if orientation == 6:
        return np.rot90(grey, -1)
    if orientation == 7:
        return np.rot90(grey, 2).T
    if orientation == 8:
        return np.rot90(grey, 1)
    return grey


def to_uint8(grey: np.ndarray) -> np.ndarray:
    """uint8 HxW from uint8 or uint16 HxW.

    16-bit images are stretched over their own min..max: X-ray detectors often fill only 10-14 of
    the 16 bits, and a fixed >> 8 would leave such an image nearly black. A flat image (min == max)
    keeps its value on the 8-bit scale instead of dividing by zero.
    """
    if grey.dtype == np.uint8:
        return grey
    if grey.dtype != np.uint16:
        raise ImageRejected(f"unsupported pixel type: {grey.dtype}")
    low, high = int(grey.min()), int(grey.max())
    if high == low:
        return np.full(grey.shape, round(low / 257), dtype=np.uint8)
    scale = 255.0 / (high - low)
    scaled = (grey.astype(np.float32) - low) * scale
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def decode_grey(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = DEFAULT_MIN_SIDE
) -> np.ndarray:
    """uint8 HxW grey image from the bytes of a PNG or JPEG file.

    Accepts 8- and 16-bit, grey, grey+alpha, RGB and RGBA; alpha is dropped, colour is converted
    with OpenCV's luma weights, 16-bit is stretched over its own range (see ``to_uint8``) and the
    EXIF orientation is applied. The header size is checked against ``max_pixels`` and
    ``min_side`` before decoding.

    Raises ImageRejected with reason "empty file", "not an image", "unsupported format: GIF",
    "truncated or corrupt", "too large: WxH = N px (maximum M)" or "too small: WxH px (minimum m)".
    """
    fmt, width, height, scan_start = _parse_header(data)
    _check_size(width, height, max_pixels, min_side)
    intact = _png_intact(data) if fmt == "PNG" else _jpeg_intact(data, scan_start)
    if not intact:
        raise ImageRejected("truncated or corrupt")

    decoded = _decode_png(data) if fmt == "PNG" else _decode_jpeg(data)
    grey = to_uint8(decoded)
    orientation = _exif_orientation(data, fmt)
    return np.ascontiguousarray(_apply_orientation(grey, orientation))


def _decode_png(data: bytes) -> np.ndarray:
    """uint8/uint16 HxW grey from PNG bytes, decoded by imagecodecs (libpng).

    imagecodecs' libpng build decodes the 224-299 px X-rays of the Kaggle set ~20% faster than
    OpenCV's, and PNG is lossless, so the pixels are the same (tests/test_preprocess.py compares both
    decoders on every PNG colour type and bit depth). It returns the file's own channels in RGB order:
    grey, grey+alpha, RGB, RGBA (palettes expanded to RGB/RGBA).
    """
    try:
        decoded = imagecodecs.png_decode(data)
    except Exception:  # PngError, or anything else libpng trips over: the bytes are not a usable PNG
        raise ImageRejected("truncated or corrupt") from None
    return _to_grey(decoded, {3: cv2.COLOR_RGB2GRAY, 4: cv2.COLOR_RGBA2GRAY})


def _decode_jpeg(data: bytes) -> np.ndarray:
    """uint8/uint16 HxW grey from JPEG bytes, decoded by OpenCV (libjpeg-turbo)."""
    # ANYDEPTH keeps 12/16 bits; ANYCOLOR keeps grey as one channel. Orientation is applied by hand
    # in decode_grey so that PNG and JPEG follow the same rule on every OpenCV version.
    flags = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR | cv2.IMREAD_IGNORE_ORIENTATION
    decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    return _to_grey(decoded, {3: cv2.COLOR_BGR2GRAY, 4: cv2.COLOR_BGRA2GRAY})


def _to_grey(decoded: np.ndarray | None, conversions: dict[int, int]) -> np.ndarray:
    """A decoder's HxW or HxWxC output -> HxW grey; ``conversions``: channel count -> cvtColor code
    (luma weights, alpha dropped) in the decoder's channel order. 1-2 channels: grey (+ alpha)."""
    if decoded is None or decoded.size == 0:
        raise ImageRejected("truncated or corrupt")
    if decoded.ndim == 2:
        return decoded
    channels = decoded.shape[2]
    if channels in (1, 2):
        return np.ascontiguousarray(decoded[:, :, 0])
    if channels in conversions:
        return cv2.cvtColor(decoded, conversions[channels])
    raise ImageRejected(f"unsupported channel count: {channels}")


def read_grey(
    path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = DEFAULT_MIN_SIDE
) -> np.ndarray:
    """uint8 HxW grey image from a PNG/JPEG file; ImageRejected (naming the path) if unusable."""
    return _decode_file(read_bytes(path), path, max_pixels=max_pixels, min_side=min_side)


def read_bytes(path: str | Path) -> bytes:
    """The file's bytes; ImageRejected("cannot read: ...") when it is missing or unreadable."""
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise ImageRejected(f"cannot read: {err.strerror or err}", str(path)) from None


def _decode_file(data: bytes, path: str | Path, *, max_pixels: int, min_side: int) -> np.ndarray:
    try:
        return decode_grey(data, max_pixels=max_pixels, min_side=min_side)
    except ImageRejected as err:
        raise ImageRejected(err.reason, str(path)) from None


# --------------------------------------------------------------------------------------------
# Resize and enhance
# --------------------------------------------------------------------------------------------


def _require_grey_uint8(img: np.ndarray, what: str) -> None:
    if img.ndim != 2 or img.dtype != np.uint8:
        raise ValueError(
            f"{what} needs a uint8 HxW grey image, got dtype={img.dtype} shape={img.shape}; "
            "decode with decode_grey() first"
        )


def resize(img: np.ndarray, size: int) -> np.ndarray:
    """uint8 (size, size) from uint8 HxW; non-square inputs are stretched, not padded.

    Area averaging when shrinking (no aliasing of rib edges and noise), bilinear when enlarging
    (area interpolation degenerates to nearest-neighbour blocks there).
    """
    _require_grey_uint8(img, "resize")
    if size < 1:
        raise ValueError(f"resize: size={size} must be a positive number of pixels")
    height, width = img.shape
    shrinking = size < height or size < width
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interpolation)


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
        _require_grey_uint8(img, "enhance")
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
    _require_grey_uint8(grey, "prepare")
    return enhance(resize(grey, spec.image_size), spec)


def prepare_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """uint8 HxW lung mask -> uint8 (size, size) in {0, 1}.

    Accepts 0/255 masks (Kaggle, thresholded at 128 to absorb JPEG noise) or masks already in
    {0, 1}. Resizing the 0/255 version and thresholding at half keeps a pixel when at least half
    its area was lung, so thin borders neither grow nor vanish.
    """
    _require_grey_uint8(mask, "prepare_mask")
    binary = mask > 0 if int(mask.max(initial=0)) <= 1 else mask >= 128
    scaled = resize(binary.astype(np.uint8) * 255, size)
    return (scaled >= 128).astype(np.uint8)


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
    _require_grey_uint8(grey, "perceptual_hash")
    # imagehash shrinks to 4x the hash size with PIL's Lanczos filter before its DCT; doing that shrink
    # with OpenCV's area filter first costs a third of the time and moves real X-rays' hashes by a few
    # bits of 256 (same near-duplicate pairs on cxr-mini).
    side = PHASH_SIZE * 4
    small = cv2.resize(grey, (side, side), interpolation=cv2.INTER_AREA) if grey.shape != (side, side) else grey
    bits = imagehash.phash(Image.fromarray(small), hash_size=PHASH_SIZE).hash.flatten()
    # First bit most significant, as imagehash prints it; packbits is 70x faster than a Python loop.
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


# --------------------------------------------------------------------------------------------
# One file, as the preprocess pipeline needs it
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessedImage:
    """One source image ready for the prepared dataset.

    image: uint8 (S, S) after ``prepare``; mask: uint8 (S, S) in {0, 1} or None (no mask, or the
    mask could not be read: ``mask_problem`` then says why); sha256: hex digest of the file bytes;
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
    data = read_bytes(path)
    sha256 = hashlib.sha256(data).hexdigest()
    grey = _decode_file(data, path, max_pixels=max_pixels, min_side=DEFAULT_MIN_SIDE)
    height, width = grey.shape
    mask = None
    mask_problem = None
    if mask_path:
        try:
            # Any size is fine for a mask: it is resized to S anyway.
            mask_grey = read_grey(mask_path, max_pixels=max_pixels, min_side=1)
            mask = prepare_mask(mask_grey, spec.image_size)
        except ImageRejected as err:
            mask_problem = err.reason
    return ProcessedImage(
        image=prepare(grey, spec),
        mask=mask,
        sha256=sha256,
        phash=perceptual_hash(grey),
        width=int(width),
        height=int(height),
        mask_problem=mask_problem,
    )


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MIN_SIDE",
    "Enhancer",
    "ImageRejected",
    "ProcessedImage",
    "apply_clahe",
    "apply_lut",
    "decode_grey",
    "enhance",
    "enhancer_for",
    "gamma_lut",
    "header_size",
    "perceptual_hash",
    "prepare",
    "prepare_mask",
    "process_file",
    "read_bytes",
    "read_grey",
    "resize",
    "sniff_format",
    "to_uint8",
]
