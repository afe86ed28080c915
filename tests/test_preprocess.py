"""Decoding, rejection, resize/enhance and process_file on tiny hand-made images."""

from __future__ import annotations

import hashlib
import io
import pickle
import struct
import zlib
from pathlib import Path

import cv2
import imagehash
import numpy as np
import pytest
from PIL import Image, ImageOps

from cxrexp.config import ImageSpec
from cxrexp.data.files import ProcessedImage, process_file
from cxrexp.images.decode import (
    ImageRejected,
    _apply_orientation,
    _jpeg_intact,
    _jpeg_scan,
    _png_intact,
    decode_grey,
    header_size,
    read_grey,
    to_uint8,
)
from cxrexp.images.hashing import perceptual_hash
from cxrexp.images.transforms import (
    Enhancer,
    enhance,
    gamma_lut,
    mask_at,
    prepare,
    prepare_mask,
    resize,
)

CXR_MINI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cxr-mini"


# ---------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------


def encode(img: np.ndarray, ext: str, *params: int) -> bytes:
    ok, buf = cv2.imencode(ext, img, list(params))
    assert ok, f"cv2.imencode({ext}) failed for shape {img.shape} {img.dtype}"
    return buf.tobytes()


def pil_bytes(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def ramp(height: int, width: int, low: int = 0, high: int = 255, dtype=np.uint8) -> np.ndarray:
    """A horizontal ramp: smooth, so JPEG round trips stay close."""
    row = np.linspace(low, high, width).round().astype(dtype)
    return np.tile(row, (height, 1))


def smooth_noise(seed: int, shape: tuple[int, int], sigma: float = 2.0) -> np.ndarray:
    """Blurred uint8 noise: image-like content with detail at every position."""
    noise = np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)
    return cv2.GaussianBlur(noise, (0, 0), sigma)


def blocks(small: np.ndarray, factor: int) -> np.ndarray:
    """Each pixel repeated factor x factor times."""
    return np.repeat(np.repeat(small, factor, 0), factor, 1)


def png_chunk(chunk_type: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + chunk_type + payload + struct.pack(">I", zlib.crc32(chunk_type + payload))


def png_claiming(width: int, height: int) -> bytes:
    """A structurally valid PNG (good CRCs, IEND) whose IHDR claims width x height grey pixels.

    Its IDAT holds one row only: a decoder that trusted the header would allocate the full image
    before noticing, which is exactly what the header check must prevent.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1))
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG with its SOF0 size fields rewritten."""
    data = bytearray(encode(ramp(40, 40), ".jpg"))
    sof = data.find(b"\xff\xc0")
    assert sof > 0, "cv2 wrote a baseline JPEG without SOF0?"
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def corrupt_idat(data: bytes) -> bytes:
    """Flip one byte inside the first IDAT payload (its CRC then no longer matches)."""
    pos = data.find(b"IDAT") + 6
    return data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1 :]


# ---------------------------------------------------------------------------------------------
# Decoding good files
# ---------------------------------------------------------------------------------------------

GREY_8 = ramp(40, 48)
BGR_RED = np.dstack([np.zeros((40, 48), np.uint8)] * 2 + [np.full((40, 48), 255, np.uint8)])
BGR_BLUE = np.dstack([np.full((40, 48), 255, np.uint8)] + [np.zeros((40, 48), np.uint8)] * 2)
GREY_16 = np.tile(np.array([1000, 2000, 4000, 4000], np.uint16), (40, 12))  # 12 bits used of 16


@pytest.mark.parametrize(
    "name, data, expected",
    [
        ("grey 8-bit PNG", encode(GREY_8, ".png"), GREY_8),
        ("grey 8-bit PNG (H,W,1)", encode(GREY_8[:, :, None], ".png"), GREY_8),
        # Luma weights 0.299 R + 0.587 G + 0.114 B: pure red -> 76.2, pure blue -> 29.1.
        ("red BGR PNG", encode(BGR_RED, ".png"), np.full((40, 48), 76, np.uint8)),
        ("blue BGR PNG", encode(BGR_BLUE, ".png"), np.full((40, 48), 29, np.uint8)),
        (
            "red BGRA PNG, alpha dropped",
            encode(np.dstack([BGR_RED, np.full((40, 48), 7, np.uint8)]), ".png"),
            np.full((40, 48), 76, np.uint8),
        ),
        (
            "grey+alpha PNG, alpha dropped",
            pil_bytes(Image.fromarray(np.dstack([GREY_8, np.full((40, 48), 9, np.uint8)]), mode="LA"), "PNG"),
            GREY_8,
        ),
        # 16-bit: stretched over its own 1000..4000 range: 1000 -> 0, 2000 -> 85, 4000 -> 255.
        ("grey 16-bit PNG", encode(GREY_16, ".png"), np.tile(np.array([0, 85, 255, 255], np.uint8), (40, 12))),
        (
            "colour 16-bit PNG",
            encode(np.dstack([GREY_16] * 3), ".png"),
            np.tile(np.array([0, 85, 255, 255], np.uint8), (40, 12)),
        ),
        (
            "colour+alpha 16-bit PNG",
            encode(np.dstack([GREY_16] * 3 + [np.full_like(GREY_16, 65535)]), ".png"),
            np.tile(np.array([0, 85, 255, 255], np.uint8), (40, 12)),
        ),
        # A flat 16-bit image must not divide by zero: it keeps its level, 4112 / 257 = 16.
        ("flat 16-bit PNG", encode(np.full((40, 48), 4112, np.uint16), ".png"), np.full((40, 48), 16, np.uint8)),
    ],
)
def test_decode_png_exact(name, data, expected):
    grey = decode_grey(data)
    assert grey.dtype == np.uint8 and grey.ndim == 2, name
    np.testing.assert_array_equal(grey, expected, err_msg=name)


def opencv_grey(data: bytes) -> np.ndarray:
    """The grey image OpenCV's own PNG decoder gives (what decode_grey used before imagecodecs)."""
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    if decoded.ndim == 3:
        decoded = cv2.cvtColor(decoded, cv2.COLOR_BGR2GRAY if decoded.shape[2] == 3 else cv2.COLOR_BGRA2GRAY)
    return decoded


def with_chunk_after_ihdr(png: bytes, chunk: bytes) -> bytes:
    """The PNG with ``chunk`` (length, type, payload, CRC) inserted right after IHDR."""
    at = len(b"\x89PNG\r\n\x1a\n") + 8 + 13 + 4  # signature, IHDR header, IHDR payload, CRC
    return png[:at] + chunk + png[at:]


NOISE_8 = smooth_noise(3, (40, 48))
NOISE_BGR = np.dstack([NOISE_8, 255 - NOISE_8, NOISE_8 // 2])
NOISE_16 = NOISE_8.astype(np.uint16) * 257 + 3


@pytest.mark.parametrize(
    "name, data",
    [
        ("grey 8-bit", encode(NOISE_8, ".png")),
        ("grey 8-bit, tRNS", pil_bytes(Image.fromarray(NOISE_8), "PNG", transparency=7)),
        ("grey 1-bit", pil_bytes(Image.fromarray(NOISE_8 > 128), "PNG")),
        ("grey 4-bit", pil_bytes(Image.fromarray(NOISE_8 // 17), "PNG", bits=4)),
        ("grey+alpha", pil_bytes(Image.fromarray(np.dstack([NOISE_8, 255 - NOISE_8]), mode="LA"), "PNG")),
        ("palette", pil_bytes(Image.fromarray(NOISE_BGR[:, :, ::-1]).convert("P"), "PNG")),
        ("palette, tRNS", pil_bytes(Image.fromarray(NOISE_BGR[:, :, ::-1]).convert("P"), "PNG", transparency=3)),
        ("RGB 8-bit", encode(NOISE_BGR, ".png")),
        ("RGBA 8-bit", encode(np.dstack([NOISE_BGR, NOISE_8]), ".png")),
        ("grey 16-bit", encode(NOISE_16, ".png")),
        ("RGB 16-bit", encode(np.dstack([NOISE_16, NOISE_16 // 2, NOISE_16 // 3]), ".png")),
        ("RGBA 16-bit", encode(np.dstack([NOISE_16] * 4), ".png")),
        ("interlaced", pil_bytes(Image.fromarray(NOISE_BGR[:, :, ::-1]), "PNG", interlace=1)),
        ("gAMA 0.45 (not applied)", with_chunk_after_ihdr(encode(NOISE_BGR, ".png"), png_chunk(b"gAMA", struct.pack(">I", 45455)))),
        ("sRGB", with_chunk_after_ihdr(encode(NOISE_8, ".png"), png_chunk(b"sRGB", b"\x00"))),
    ],
)
def test_png_decoder_gives_opencv_pixels(name, data):
    # decode_grey decodes PNG with imagecodecs (faster) and must give exactly the pixels OpenCV's
    # decoder gives, so prepared datasets and served models agree whichever decoded them.
    reference = to_uint8(opencv_grey(data))
    np.testing.assert_array_equal(decode_grey(data, min_side=8), reference, err_msg=name)


@pytest.mark.parametrize(
    "name, img, expected",
    [
        ("grey JPEG", GREY_8, GREY_8),
        ("colour JPEG", np.dstack([GREY_8, GREY_8 // 2, 255 - GREY_8]), None),
        ("grey JPEG (H,W,1)", GREY_8[:, :, None], GREY_8),
    ],
)
def test_decode_jpeg_close_to_source(name, img, expected):
    if expected is None:
        expected = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    grey = decode_grey(encode(img, ".jpg", cv2.IMWRITE_JPEG_QUALITY, 95))
    assert grey.shape == expected.shape and grey.dtype == np.uint8, name
    mean_error = np.abs(grey.astype(int) - expected.astype(int)).mean()
    assert mean_error < 3.0, f"{name}: mean abs error {mean_error:.2f} after a quality-95 round trip"


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_pillow(orientation):
    img = np.arange(12, dtype=np.uint8).reshape(3, 4)
    pil = Image.fromarray(img)
    exif = pil.getexif()
    exif[0x0112] = orientation
    pil.info["exif"] = exif.tobytes()
    np.testing.assert_array_equal(_apply_orientation(img, orientation), np.asarray(ImageOps.exif_transpose(pil)))


def test_decode_applies_exif_rotation():
    tall = Image.fromarray(ramp(40, 64))  # 64 wide, 40 high
    exif = tall.getexif()
    exif[0x0112] = 6  # stored rotated: display needs 90 degrees clockwise
    assert decode_grey(pil_bytes(tall, "JPEG", exif=exif.tobytes())).shape == (64, 40)
    assert decode_grey(pil_bytes(tall, "JPEG")).shape == (40, 64)


# ---------------------------------------------------------------------------------------------
# Rejecting bad files
# ---------------------------------------------------------------------------------------------

GOOD_PNG = encode(smooth_noise(0, (64, 64)), ".png")
GOOD_JPEG = encode(smooth_noise(1, (64, 64)), ".jpg")


@pytest.mark.parametrize(
    "name, data, reason",
    [
        ("zero bytes", b"", "empty file"),
        ("text renamed .png", b"patient_id,label\n17,COVID\n", "not an image"),
        ("PNG cut in half", GOOD_PNG[: len(GOOD_PNG) // 2], "truncated or corrupt"),
        ("PNG missing IEND", GOOD_PNG[:-12], "truncated or corrupt"),
        ("PNG signature only", GOOD_PNG[:8], "truncated or corrupt"),
        ("PNG with a flipped IDAT byte", corrupt_idat(GOOD_PNG), "truncated or corrupt"),
        ("JPEG cut in half", GOOD_JPEG[: len(GOOD_JPEG) // 2], "truncated or corrupt"),
        ("JPEG missing its last two bytes", GOOD_JPEG[:-2], "truncated or corrupt"),
        ("JPEG signature only", GOOD_JPEG[:3], "truncated or corrupt"),
        ("GIF", pil_bytes(Image.fromarray(GREY_8), "GIF"), "unsupported format: GIF"),
        ("BMP", encode(GREY_8, ".bmp"), "unsupported format: BMP"),
        ("TIFF", encode(GREY_8, ".tiff"), "unsupported format: TIFF"),
        ("10x10 PNG", encode(np.zeros((10, 10), np.uint8), ".png"), "too small: 10x10 px (minimum 32)"),
        ("40x20 JPEG", encode(np.zeros((20, 40), np.uint8), ".jpg"), "too small: 40x20 px (minimum 32)"),
        (
            "PNG header claiming 30000x30000",
            png_claiming(30000, 30000),
            "too large: 30000x30000 = 900000000 px (maximum 64000000)",
        ),
        (
            "JPEG header claiming 20000x10000",
            jpeg_claiming(20000, 10000),
            "too large: 20000x10000 = 200000000 px (maximum 64000000)",
        ),
    ],
)
def test_bad_input_rejected_with_reason(name, data, reason):
    with pytest.raises(ImageRejected) as caught:
        decode_grey(data)
    assert caught.value.reason == reason, name


def with_text_chunk(png: bytes, crc_ok: bool) -> bytes:
    """The PNG with a tEXt chunk inserted after IHDR, its CRC right or wrong."""
    chunk = png_chunk(b"tEXt", b"Comment\x00scanned at site 3")
    if not crc_ok:
        chunk = chunk[:-4] + bytes(4)
    return with_chunk_after_ihdr(png, chunk)


# OpenCV 5 refuses these files by itself, but older builds (pyproject allows 4.8) return half a
# JPEG without an error: the structural checks are what makes the rejection independent of that.
@pytest.mark.parametrize(
    "name, data, intact",
    [
        ("whole PNG", GOOD_PNG, True),
        ("PNG cut in half", GOOD_PNG[: len(GOOD_PNG) // 2], False),
        ("PNG missing IEND", GOOD_PNG[:-12], False),
        ("PNG with a flipped IDAT byte", corrupt_idat(GOOD_PNG), False),
        ("PNG with a bad ancillary CRC (tolerated, as libpng does)", with_text_chunk(GOOD_PNG, crc_ok=False), True),
        ("whole JPEG", GOOD_JPEG, True),
        ("JPEG with trailing bytes", GOOD_JPEG + b"\x00" * 16, True),
        ("JPEG cut in half", GOOD_JPEG[: len(GOOD_JPEG) // 2], False),
        ("JPEG cut at 95%", GOOD_JPEG[: len(GOOD_JPEG) * 95 // 100], False),
    ],
)
def test_structure_check(name, data, intact):
    if data.startswith(b"\x89PNG"):
        assert _png_intact(data) is intact, name
    else:
        _, _, scan_start = _jpeg_scan(data)
        assert _jpeg_intact(data, scan_start) is intact, name
    if intact:
        assert decode_grey(data).shape == (64, 64), name


def test_limits_are_parameters():
    data = encode(np.zeros((64, 64), np.uint8), ".png")
    with pytest.raises(ImageRejected, match=r"too large: 64x64 = 4096 px \(maximum 4000\)"):
        decode_grey(data, max_pixels=4000)
    with pytest.raises(ImageRejected, match=r"too small: 64x64 px \(minimum 65\)"):
        decode_grey(data, min_side=65)
    assert decode_grey(encode(np.zeros((10, 10), np.uint8), ".png"), min_side=1).shape == (10, 10)


@pytest.mark.parametrize(
    "data, expected",
    [(GOOD_PNG, ("PNG", 64, 64)), (GOOD_JPEG, ("JPEG", 64, 64)), (png_claiming(30000, 20), ("PNG", 30000, 20))],
)
def test_header_size_reads_without_decoding(data, expected):
    assert header_size(data) == expected


def test_read_grey_names_the_missing_file(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(ImageRejected) as caught:
        read_grey(missing)
    assert caught.value.reason.startswith("cannot read: ")
    assert str(missing) in str(caught.value)


def test_read_grey_names_the_bad_file(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not pixels")
    with pytest.raises(ImageRejected) as caught:
        read_grey(path)
    assert caught.value.reason == "not an image" and caught.value.path == str(path)


def test_image_rejected_survives_pickling():
    # A pool worker raises it back to the parent through pickle.
    err = pickle.loads(pickle.dumps(ImageRejected("empty file", "/data/a.png")))
    assert (err.reason, err.path, str(err)) == ("empty file", "/data/a.png", "/data/a.png: empty file")
    assert isinstance(err, ValueError)


# ---------------------------------------------------------------------------------------------
# Resize and enhance
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, size",
    [((64, 64), 32), ((80, 100), 32), ((20, 20), 48), ((300, 40), 64), ((32, 32), 32)],
)
def test_resize_shape_and_dtype(shape, size):
    out = resize(np.full(shape, 77, np.uint8), size)
    assert out.shape == (size, size) and out.dtype == np.uint8
    assert (out == 77).all()  # a constant stays constant under either interpolation


def test_resize_shrinks_by_area_average():
    img = np.zeros((6, 6), np.uint8)
    img[0, 0] = 255  # bilinear sampling of the block centre would give 0; the area mean is 255/9
    np.testing.assert_array_equal(resize(img, 2), np.array([[28, 0], [0, 0]], np.uint8))


def test_resize_enlarges_bilinearly():
    img = np.array([[0, 100], [100, 200]], np.uint8)
    # Half-pixel centres: output x=1 samples source x=0.25 -> 0.75*0 + 0.25*100 = 25.
    np.testing.assert_array_equal(resize(img, 4)[0], np.array([0, 25, 75, 100], np.uint8))


@pytest.mark.parametrize(
    "gamma, level, expected",
    [
        (0.5, 0, 0),
        (0.5, 64, 128),  # 255 * sqrt(64/255) = 127.75
        (0.5, 255, 255),
        (2.0, 128, 64),  # 255 * (128/255)^2 = 64.25
        (1.0, 77, 77),
        (0.8, 128, 147),  # 255 * 0.50196^0.8 = 146.9
    ],
)
def test_gamma_lut_values(gamma, level, expected):
    assert gamma_lut(gamma)[level] == expected
    spec = ImageSpec(image_size=16, enhance="gamma", gamma=gamma)
    assert enhance(np.full((2, 2), level, np.uint8), spec)[0, 0] == expected


def test_enhance_none_is_an_identity_copy():
    img = np.arange(16, dtype=np.uint8).reshape(4, 4)
    out = enhance(img, ImageSpec(enhance="none"))
    np.testing.assert_array_equal(out, img)
    out[0, 0] = 99
    assert img[0, 0] == 0, "enhance must not hand back the caller's array"


@pytest.mark.parametrize("level", [0, 100, 255])
def test_clahe_on_constant_image_stays_constant(level):
    out = enhance(np.full((64, 64), level, np.uint8), ImageSpec(enhance="clahe"))
    assert int(out.max()) - int(out.min()) <= 1


@pytest.mark.parametrize(
    "tile_grid, clip_limit, min_spread",
    [
        # One tile: a clipped global equalisation, so the ramp keeps its order and a higher clip
        # limit stretches more (31 grey levels in: 85 out at clip 2, 139 at clip 4).
        (1, 2.0, 62),
        (1, 4.0, 124),
        # 8x8 tiles of 8x8 px: the clip limit (relative to the tile area) decides the stretch.
        (8, 40.0, 124),
    ],
)
def test_clahe_stretches_a_low_contrast_ramp(tile_grid, clip_limit, min_spread):
    low_contrast = ramp(64, 64, 100, 131)
    out = enhance(low_contrast, ImageSpec(enhance="clahe", clip_limit=clip_limit, tile_grid=tile_grid))
    assert np.ptp(low_contrast) == 31 and np.ptp(out) >= min_spread
    if tile_grid == 1:
        assert (np.diff(out.astype(int), axis=1) >= 0).all(), "a single-tile CLAHE must keep the ramp's order"


def test_enhancer_is_settings_plus_pure_call():
    enhancer = Enhancer("gamma", gamma=0.5)
    img = np.full((3, 3), 64, np.uint8)
    assert (enhancer(img) == 128).all() and (enhancer(img) == enhancer(img)).all()
    with pytest.raises(ValueError, match="not one of"):
        Enhancer("sharpen")


@pytest.mark.parametrize("bad", [np.zeros((8, 8), np.float32), np.zeros((8, 8, 3), np.uint8)])
def test_enhance_and_resize_refuse_non_grey_uint8(bad):
    with pytest.raises(ValueError, match="uint8 HxW"):
        enhance(bad, ImageSpec())
    with pytest.raises(ValueError, match="uint8 HxW"):
        resize(bad, 16)


@pytest.mark.parametrize("method", ["clahe", "gamma", "none"])
def test_prepare_is_resize_then_enhance(method):
    grey = smooth_noise(3, (120, 90), sigma=3.0)
    spec = ImageSpec(image_size=32, enhance=method)
    out = prepare(grey, spec)
    assert out.shape == (32, 32) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, enhance(resize(grey, 32), spec))


@pytest.mark.parametrize(
    "name, mask, size, expected",
    [
        ("0/255 halves", blocks(np.array([[255, 0], [255, 0]], np.uint8), 3), 2, [[1, 0], [1, 0]]),
        ("already {0,1}", blocks(np.array([[0, 1], [1, 1]], np.uint8), 3), 2, [[0, 1], [1, 1]]),
        # Per 3x3 block: 5 of 9 lung pixels (142/255 after area) stays lung, 4 of 9 (113) does not.
        (
            "half-area rule",
            np.array(
                [
                    [255, 255, 255, 255, 255, 0],
                    [255, 255, 0, 255, 255, 0],
                    [0, 0, 0, 0, 0, 0],
                    [255, 255, 255, 0, 0, 0],
                    [255, 255, 255, 0, 0, 0],
                    [255, 255, 255, 0, 0, 0],
                ],
                np.uint8,
            ),
            2,
            [[1, 0], [1, 0]],
        ),
        ("JPEG-noisy 0/255", np.array([[250, 3], [247, 9]], np.uint8), 2, [[1, 0], [1, 0]]),
        ("enlarged", np.array([[255, 0], [0, 0]], np.uint8), 4, blocks(np.array([[1, 0], [0, 0]]), 2)),
    ],
)
def test_prepare_mask_binary(name, mask, size, expected):
    out = prepare_mask(mask, size)
    assert out.dtype == np.uint8, name
    np.testing.assert_array_equal(out, np.array(expected, np.uint8), err_msg=name)


@pytest.mark.parametrize(
    "name, mask, shape, expected",
    [
        ("0/255 to a wide shape", np.array([[255, 0], [0, 0]], np.uint8), (2, 4), [[1, 1, 0, 0], [0, 0, 0, 0]]),
        ("{0,1} to a tall shape", np.array([[1, 0], [0, 1]], np.uint8), (4, 2), [[1, 0], [1, 0], [0, 1], [0, 1]]),
        ("JPEG noise below half", np.array([[127, 200]], np.uint8), (1, 2), [[0, 1]]),
    ],
)
def test_mask_at_keeps_the_one_lung_pixel_rule_at_any_shape(name, mask, shape, expected):
    out = mask_at(mask, shape)
    np.testing.assert_array_equal(out, np.array(expected, np.uint8), err_msg=name)
    assert np.array_equal(prepare_mask(mask, 3), mask_at(mask, (3, 3))), name


def test_prepare_pair_reads_01_and_0255_masks_alike_with_a_lung_view():
    from cxrexp.config import ImageSpec
    from cxrexp.data.files import prepare_pair

    grey = smooth_noise(3, (300, 240), sigma=4.0)
    mask = np.zeros((300, 240), np.uint8)
    mask[60:240, 30:110] = 1
    mask[60:240, 130:210] = 1
    spec = ImageSpec(image_size=32, lungs="crop")
    _, from01 = prepare_pair(grey, mask, spec)
    _, from255 = prepare_pair(grey, mask * 255, spec)
    assert from01 is not None and from01.max() == 1
    np.testing.assert_array_equal(from01, from255)


def test_perceptual_hash_is_a_256_bit_int_tolerant_of_small_changes():
    grey = smooth_noise(4, (96, 96), sigma=4.0)
    value = perceptual_hash(grey)
    assert isinstance(value, int) and 0 <= value < 2**256
    small = cv2.resize(grey, (64, 64), interpolation=cv2.INTER_AREA)
    assert value == int(str(imagehash.phash(Image.fromarray(small), hash_size=16)), 16)
    brighter = np.clip(grey.astype(int) + 6, 0, 255).astype(np.uint8)
    other = smooth_noise(40, (96, 96), sigma=4.0)
    assert bin(value ^ perceptual_hash(brighter)).count("1") <= 16
    assert bin(value ^ perceptual_hash(other)).count("1") > 64


# ---------------------------------------------------------------------------------------------
# process_file
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def image_and_mask(tmp_path):
    grey = smooth_noise(5, (60, 80))
    image_path = tmp_path / "img.png"
    image_path.write_bytes(encode(np.dstack([grey] * 3), ".png"))  # grey stored as RGB, as in Kaggle
    mask = np.zeros((60, 80), np.uint8)
    mask[:, :40] = 255
    mask_path = tmp_path / "mask.png"
    mask_path.write_bytes(encode(mask, ".png"))
    return image_path, mask_path, grey


def test_process_file_with_mask(image_and_mask):
    image_path, mask_path, grey = image_and_mask
    spec = ImageSpec(image_size=32, enhance="clahe", lungs="none")
    result = process_file(str(image_path), str(mask_path), spec, 64_000_000)
    assert isinstance(result, ProcessedImage)
    assert result.image.shape == (32, 32) and result.image.dtype == np.uint8
    np.testing.assert_array_equal(result.image, prepare(grey, spec))
    assert result.mask.shape == (32, 32) and set(np.unique(result.mask)) == {0, 1}
    assert result.mask[:, :16].all() and not result.mask[:, 16:].any()
    assert result.sha256 == hashlib.sha256(image_path.read_bytes()).hexdigest()
    assert result.phash == perceptual_hash(grey)  # before enhancement
    assert (result.width, result.height) == (80, 60)
    assert result.mask_problem is None
    # A pool sends the result back through pickle.
    again = pickle.loads(pickle.dumps(result))
    np.testing.assert_array_equal(again.image, result.image)


@pytest.mark.parametrize(
    "mask_name, mask_bytes, problem",
    [
        (None, None, None),
        ("mask.png", b"garbage", "not an image"),
        ("missing.png", None, "cannot read: "),
    ],
)
def test_process_file_without_a_usable_mask_keeps_the_image(image_and_mask, tmp_path, mask_name, mask_bytes, problem):
    image_path, _, _ = image_and_mask
    mask_path = None
    if mask_name is not None:
        mask_path = tmp_path / ("bad_" + mask_name)
        if mask_bytes is not None:
            mask_path.write_bytes(mask_bytes)
    result = process_file(str(image_path), str(mask_path) if mask_path else None, ImageSpec(image_size=32, lungs="none"), 64_000_000)
    assert result.mask is None
    assert result.image.shape == (32, 32)
    if problem is None:
        assert result.mask_problem is None
    else:
        assert result.mask_problem.startswith(problem)


def test_process_file_rejects_bad_image_naming_it(tmp_path):
    path = tmp_path / "half.png"
    path.write_bytes(GOOD_PNG[: len(GOOD_PNG) // 2])
    with pytest.raises(ImageRejected) as caught:
        process_file(str(path), None, ImageSpec(image_size=32, lungs="none"), 64_000_000)
    assert caught.value.reason == "truncated or corrupt" and str(path) in str(caught.value)


def test_process_file_is_picklable_for_a_pool():
    assert pickle.loads(pickle.dumps(process_file)) is process_file


# ---------------------------------------------------------------------------------------------
# Real files (optional)
# ---------------------------------------------------------------------------------------------


def test_decodes_real_cxr_mini_files():
    if not CXR_MINI.is_dir():
        pytest.skip(f"real sample set not found at {CXR_MINI}")
    paths = sorted((CXR_MINI / "COVID" / "images").glob("*.png"))[:3] + sorted(
        (CXR_MINI / "Normal" / "images").glob("*.png")
    )[:3]
    if not paths:
        pytest.skip(f"no PNGs under {CXR_MINI}/<Class>/images")
    spec = ImageSpec(image_size=64, lungs="none")
    for path in paths:
        grey = read_grey(path)
        np.testing.assert_array_equal(grey, cv2.imread(str(path), cv2.IMREAD_GRAYSCALE), err_msg=str(path))
        result = process_file(str(path), None, spec, 64_000_000)
        assert result.image.shape == (64, 64) and (result.width, result.height) == grey.shape[::-1]
        assert result.image.std() > 10, f"{path}: prepared image is nearly flat"
