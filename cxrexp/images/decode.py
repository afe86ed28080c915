"""Decode and check chest X-ray files: PNG/JPEG bytes -> uint8 grey, pure numpy / OpenCV / imagecodecs / Pillow.

Bad inputs raise :class:`ImageRejected` with a short ``reason`` that ends up in ``skipped.csv``.
The header is parsed by hand (PNG IHDR, JPEG SOF) and the file's structure is checked (PNG chunk
chain up to IEND, JPEG end-of-image marker) before any pixel is decoded, so a decompression bomb
or a half-downloaded file costs microseconds and the result does not depend on how forgiving the
installed OpenCV build happens to be (older builds half-decode a truncated JPEG without error).
Nothing here writes files or talks to MLflow.
"""

from __future__ import annotations

import io
import os
import re
import stat
import struct
import zlib
from pathlib import Path

import cv2
import imagecodecs
import numpy as np
from PIL import Image

from cxrexp.config import MAX_PIXELS

DEFAULT_MAX_PIXELS = MAX_PIXELS
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

# Bounds on the hand-written header walks, so a pathological file (a run of 60 MiB of FF after SOI,
# millions of empty PNG chunks) is rejected after a bounded number of Python steps instead of
# seconds of looping. Real files are far inside both: a JPEG carries a few dozen segments before its
# first scan (APPn, DQT, DHT, SOF; a split ICC profile adds a few more), and PNG encoders write IDAT
# chunks of 8-64 KiB, so even a 100 MB PNG has a few thousand chunks.
MAX_JPEG_SEGMENTS = 1000
PNG_CHUNK_ALLOWANCE = 1000  # plus one chunk per PNG_BYTES_PER_CHUNK bytes of file
PNG_BYTES_PER_CHUNK = 1024
# A file is read whole, so its size is checked first (from fstat, nothing read). Eight bytes per
# allowed pixel covers an uncompressed 16-bit RGBA image of max_pixels; anything bigger is not an
# X-ray this pipeline would accept anyway.
BYTES_PER_PIXEL_LIMIT = 8
_FF_RUN_END = re.compile(rb"[^\xff]")


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
    budget = PNG_CHUNK_ALLOWANCE + end // PNG_BYTES_PER_CHUNK
    while pos + 12 <= end:
        budget -= 1
        if budget < 0:
            raise ImageRejected(
                f"pathological PNG: more than {PNG_CHUNK_ALLOWANCE} + 1 per {PNG_BYTES_PER_CHUNK} bytes chunks")
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
    """(width, height, offset of the first scan's data) from the JPEG marker segments.

    Also refuses what the decoders would get wrong: CMYK/YCCK (four components: OpenCV inverts or
    misconverts them, and no X-ray is stored that way) and more than ``MAX_JPEG_SEGMENTS`` segments
    before the first scan (a pathological file; see the constant).
    """
    pos = 2  # after SOI
    end = len(data)
    size: tuple[int, int] | None = None
    for _ in range(MAX_JPEG_SEGMENTS):
        if pos >= end:
            break
        if data[pos] != 0xFF:
            raise ImageRejected("truncated or corrupt")
        # Fill bytes may pad before a marker: skipped by the regex engine, not a Python loop.
        found = _FF_RUN_END.search(data, pos)
        if found is None:
            break
        pos = found.start()
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
        if marker in _JPEG_SOF_MARKERS and length >= 8:
            height, width = struct.unpack(">HH", data[pos + 3 : pos + 7])
            if data[pos + 7] == 4:
                raise ImageRejected("unsupported colour: CMYK/YCCK JPEG (save it as greyscale PNG or JPEG)")
            size = (width, height)
        if marker == 0xDA:  # SOS: entropy-coded data follows the header
            if size is None:
                break
            return size[0], size[1], pos + length
        pos += length
    else:
        raise ImageRejected(f"pathological JPEG: more than {MAX_JPEG_SEGMENTS} marker segments before the image data")
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
    if decoded is None:
        # OpenCV's libjpeg is built for 8 bits only; 12-bit and 16-bit lossless JPEGs (common where
        # films come out of DICOM) decode with imagecodecs' libjpeg-turbo 3, which reads all
        # precisions. Its output is RGB (or grey) order, uint16 above 8 bits.
        try:
            decoded = imagecodecs.jpeg8_decode(data)
        except Exception:  # Jpeg8Error or anything libjpeg trips over: not a usable JPEG
            raise ImageRejected("truncated or corrupt") from None
        return _to_grey(decoded, {3: cv2.COLOR_RGB2GRAY})
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
    return decode_file(read_bytes(path, max_bytes=max_file_bytes(max_pixels)), path, max_pixels=max_pixels,
                       min_side=min_side)


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words, from its ``st_mode`` ("a FIFO", "a socket", ...)."""
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "an unknown kind of file"


def read_bytes(path: str | Path, *, max_bytes: int | None = None) -> bytes:
    """The file's bytes; ImageRejected naming the path when it cannot or should not be read.

    Opened without blocking and checked with fstat before any byte is read: a FIFO (whose read
    would wait for a writer forever) or a device is refused as "not a regular file: a FIFO", and
    a file over ``max_bytes`` as "too large: file of N bytes". A file that vanished or is
    unreadable gives "cannot read: <the system's reason>".
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise ImageRejected(f"cannot read: {err.strerror or err}", str(path)) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageRejected(f"not a regular file: {file_kind(info.st_mode)}", str(path))
        if max_bytes is not None and info.st_size > max_bytes:
            raise ImageRejected(f"too large: file of {info.st_size} bytes (maximum {max_bytes})", str(path))
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read()
    except OSError as err:
        raise ImageRejected(f"cannot read: {err.strerror or err}", str(path)) from None
    finally:
        os.close(fd)


def max_file_bytes(max_pixels: int) -> int:
    """The largest file read for an image limit of ``max_pixels`` (see BYTES_PER_PIXEL_LIMIT)."""
    return int(max_pixels) * BYTES_PER_PIXEL_LIMIT


def decode_file(data: bytes, path: str | Path, *, max_pixels: int, min_side: int) -> np.ndarray:
    try:
        return decode_grey(data, max_pixels=max_pixels, min_side=min_side)
    except ImageRejected as err:
        raise ImageRejected(err.reason, str(path)) from None


