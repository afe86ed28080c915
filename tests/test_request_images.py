"""Request rows -> image batches (``cxrexp.request_images``): pure, no MLflow, no Keras."""

from __future__ import annotations

import base64
import json

import cv2
import numpy as np
import pytest

from cxrexp.config import ImageSpec
from cxrexp.images.decode import decode_grey
from cxrexp.images.request_images import (
    MAX_LISTED_ERRORS,
    Deadline,
    RequestRejected,
    RequestTimedOut,
    RowRejected,
    ServingSpec,
    decode_base64_image,
    label_probabilities,
    prepare_batch,
    prepare_chunks,
    row_bytes,
)
from cxrexp.images.transforms import prepare

SPEC = ImageSpec(image_size=32, enhance="clahe", clip_limit=2.0, tile_grid=4)




PNG_HEAD = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "text",
    [
        "iVBORw0KGgo=",  # standard
        "iVBORw0KGgo",  # padding dropped
        "data:image/png;base64,iVBORw0KGgo=",  # data URL
        "  iVBORw0K\nGgo=\n",  # MIME line breaks and surrounding blanks
        base64.urlsafe_b64encode(PNG_HEAD).decode(),  # URL-safe alphabet (here identical)
    ],
)
def test_decode_base64_image_accepts_common_forms(text):
    assert decode_base64_image(text, max_bytes=100) == PNG_HEAD


def test_decode_base64_image_urlsafe_alphabet():
    data = bytes([0xFB, 0xFF, 0xBF])  # standard "+/+/", URL-safe "-_-_"
    assert decode_base64_image(base64.urlsafe_b64encode(data).decode(), max_bytes=10) == data


@pytest.mark.parametrize(
    "value, reason",
    [
        ("!!!not base64", "not base64"),
        ("iVBORw0KGgo*=", "not base64"),  # a stray character: decodebytes would drop it silently
        ("abcde", "not base64: truncated"),
        ("   ", "empty base64 string"),
        ("data:image/png;base64,", "empty base64 string"),
        ("A" * 400, "too large"),  # 300 bytes > max_bytes=100, refused before decoding
        (b"", "empty file"),
        (b"x" * 101, "too large: 101 bytes (maximum 100)"),
        (None, "missing image"),
        (float("nan"), "missing image"),
        (12, "unsupported value of type int"),
    ],
)
def test_row_bytes_rejects_with_reason(value, reason):
    with pytest.raises(RowRejected) as err:
        row_bytes(value, max_bytes=100)
    assert reason in err.value.reason


@pytest.mark.parametrize(
    "probabilities, threshold, labels",
    [
        ([0.2, 0.43, 0.9], 0.43, ["Normal", "COVID", "COVID"]),  # the cut is inclusive
        ([0.0, 1.0], 0.5, ["Normal", "COVID"]),
        ([0.5], 1.0, ["Normal"]),
    ],
)
def test_label_probabilities(probabilities, threshold, labels):
    out = label_probabilities(np.array(probabilities), ServingSpec(SPEC, threshold))
    assert out["label"].tolist() == labels
    assert out["probability"].dtype == np.float64
    np.testing.assert_allclose(out["probability"], probabilities)


@pytest.mark.parametrize("threshold", [1.5, -0.1, float("nan"), float("inf")])
def test_serving_spec_rejects_bad_threshold(threshold):
    with pytest.raises(ValueError, match="threshold"):
        ServingSpec(SPEC, threshold)


def test_serving_spec_refuses_extra_keys_that_clash():
    with pytest.raises(ValueError, match=r"\['threshold'\]"):
        ServingSpec(SPEC, 0.5, extra={"threshold": 0.9})


def test_serving_spec_json_round_trip():
    spec = ServingSpec(SPEC, 0.43, max_pixels=5000, max_bytes=77, extra={"run": "abc"})
    raw = json.loads(json.dumps(spec.to_json_dict()))
    assert raw["image_spec"]["tile_grid"] == 4 and raw["threshold"] == 0.43 and raw["run"] == "abc"
    assert ServingSpec.from_json_dict(raw) == spec


def _png(height: int, width: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    ok, encoded = cv2.imencode(".png", rng.integers(0, 256, (height, width), dtype=np.uint8))
    assert ok
    return encoded.tobytes()


ROWS = [_png(40 + 7 * i, 50 + 3 * i, i) for i in range(7)]


def _expected(cells: list[bytes]) -> np.ndarray:
    """The training path, image by image: decode_grey, prepare, / 255."""
    return np.stack([prepare(decode_grey(c), SPEC) for c in cells]).astype(np.float32)[..., None] / np.float32(255)


@pytest.mark.parametrize(
    "workers, chunk_rows",
    [(1, 1), (1, 3), (2, 2), (4, 3), (8, 100)],  # 100 > rows: one chunk
)
def test_chunks_come_in_row_order_with_the_training_pixels_whatever_the_threads(workers, chunk_rows):
    spec = ServingSpec(SPEC, 0.5)
    chunks = list(prepare_chunks(ROWS, spec, chunk_rows, workers=workers))
    assert [start for start, _ in chunks] == list(range(0, len(ROWS), chunk_rows))
    assert all(len(chunk) == min(chunk_rows, len(ROWS) - start) for start, chunk in chunks)
    np.testing.assert_array_equal(np.concatenate([chunk for _, chunk in chunks]), _expected(ROWS))


@pytest.mark.parametrize("workers", [1, 3])
def test_a_bad_row_stops_the_chunks_and_every_bad_row_is_listed(workers):
    cells = [ROWS[0], ROWS[1], b"junk", ROWS[3], None, ROWS[5]]
    yielded = []
    with pytest.raises(RequestRejected) as err:
        for start, _ in prepare_chunks(cells, ServingSpec(SPEC, 0.5), 2, workers=workers):
            yielded.append(start)
    assert yielded == [0]  # rows 0-1 were fine; nothing after the chunk holding row 2
    assert err.value.errors == ["row 2: not an image", "row 4: missing image (null)"]
    assert str(err.value).startswith("2 of 6 rows rejected, nothing was scored: row 2: not an image; row 4")


def test_a_long_list_of_bad_rows_is_cut_but_counted():
    cells = [b"junk"] * (MAX_LISTED_ERRORS + 5)
    with pytest.raises(RequestRejected) as err:
        prepare_batch(cells, ServingSpec(SPEC, 0.5), workers=1)
    assert len(err.value.errors) == MAX_LISTED_ERRORS + 5
    assert str(err.value).endswith("; ... and 5 more")
    assert str(err.value).count("not an image") == MAX_LISTED_ERRORS


def test_an_empty_request_is_an_empty_batch():
    assert prepare_batch([], ServingSpec(SPEC, 0.5)).shape == (0, 32, 32, 1)


# --------------------------------------------------------------------------------------------------
# Request-level limits: enforced from the headers, before any image is decoded


@pytest.mark.parametrize(
    "name, n_rows, max_rows, max_request_pixels, words",
    [
        ("too many rows", 3, 2, 10**9, "3 rows, more than the limit of 2 rows per request (max_rows)"),
        ("too many pixels", 3, 100, 2 * 64 * 64 + 1, f"{3 * 64 * 64} pixels in all, more than the limit"),
        ("within both", 3, 3, 3 * 64 * 64, None),
    ],
)
def test_request_limits_refuse_before_decoding(monkeypatch, name, n_rows, max_rows, max_request_pixels, words):
    from cxrexp.images import decode

    cells = [_png(64, 64, seed) for seed in range(n_rows)]
    cells[0] = base64.b64encode(cells[0]).decode()  # base64 rows count by their decoded header too
    calls = []
    real = decode.decode_grey
    monkeypatch.setattr(decode, "decode_grey", lambda *a, **k: calls.append(1) or real(*a, **k))
    spec = ServingSpec(SPEC, 0.5, max_rows=max_rows, max_request_pixels=max_request_pixels)
    if words is None:
        assert prepare_batch(cells, spec, workers=1).shape == (n_rows, 32, 32, 1), name
        assert len(calls) == n_rows
        return
    with pytest.raises(RequestRejected, match=words.replace("(", r"\(").replace(")", r"\)")):
        prepare_batch(cells, spec, workers=1)
    assert calls == [], f"{name}: an image was decoded before the limit refused the request"


class _Ticks:
    """A clock that advances one second per reading: deterministic time for the deadline tests."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.mark.parametrize("workers, seconds, most_decoded", [
    (1, 0.0, 0),  # already past: nothing is decoded
    (4, 0.0, 0),
    (1, 4.5, 4),  # time runs out after four rows: the other 36 are never started
])
def test_past_its_deadline_a_request_stops_decoding(monkeypatch, workers, seconds, most_decoded):
    from cxrexp.images import decode

    calls = []
    real = decode.decode_grey
    monkeypatch.setattr(decode, "decode_grey", lambda *a, **k: calls.append(1) or real(*a, **k))
    cells = [_png(64, 64, seed) for seed in range(40)]
    deadline = Deadline(seconds, started=0.0, clock=_Ticks())
    with pytest.raises(RequestTimedOut, match="longer than its timeout"):
        for _ in prepare_chunks(cells, ServingSpec(SPEC, 0.5), 8, workers=workers, deadline=deadline):
            pass
    assert len(calls) <= most_decoded


def test_rows_the_limits_cannot_read_are_left_to_the_row_checks():
    cells = [_png(64, 64, 1), b"not an image", None]
    with pytest.raises(RequestRejected, match="row 1: .*; row 2: missing image"):
        prepare_batch(cells, ServingSpec(SPEC, 0.5, max_request_pixels=64 * 64), workers=1)


@pytest.mark.parametrize(
    "environ, rows, pixels, error",
    [
        ({}, 2000, 1024**3, None),  # as logged (the defaults here)
        ({"CXREXP_MAX_ROWS": "10"}, 10, 1024**3, None),
        ({"CXREXP_MAX_ROWS": " ", "CXREXP_MAX_REQUEST_PIXELS": "5000"}, 2000, 5000, None),
        ({"CXREXP_MAX_ROWS": "lots"}, None, None, "CXREXP_MAX_ROWS='lots' is not a whole number"),
        ({"CXREXP_MAX_ROWS": "0"}, None, None, "max_rows=0"),
    ],
)
def test_served_limits_come_from_the_environment(environ, rows, pixels, error):
    from cxrexp.images.request_images import with_served_limits

    spec = ServingSpec(SPEC, 0.5)
    if error:
        with pytest.raises(ValueError, match=error):
            with_served_limits(spec, environ)
        return
    served = with_served_limits(spec, environ)
    assert (served.max_rows, served.max_request_pixels) == (rows, pixels)
    assert ServingSpec.from_json_dict(served.to_json_dict()) == served  # the limits travel with the spec
