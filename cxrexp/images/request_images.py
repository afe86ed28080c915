"""Request rows -> image batches and probabilities -> labels: the served model's pure half.

A request cell (PNG/JPEG bytes, or their base64 text) becomes the uint8 (S, S) image the training
set was made of, through the very functions that built it (``preprocess.decode_grey`` then
``preprocess.prepare``) with the ``ImageSpec`` stored beside the weights; ``ServingSpec`` is that
stored metadata. No MLflow and no Keras here: ``serving`` wraps these functions in the pyfunc model
and turns ``RequestRejected`` into MLflow's INVALID_PARAMETER_VALUE, and tests and benchmarks call
them directly.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import pandas as pd

from cxrexp.config import MAX_PIXELS, ImageSpec

INPUT_COLUMN = "image"
# 64 MiB: a 16-bit 4k x 4k PNG is ~32 MiB; anything bigger is more likely abuse than an X-ray.
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_PIXELS = MAX_PIXELS
MIN_SIDE = 32
# Rows per forward pass: bounds memory for big requests (1024 px x 32 x 4 B = 128 MiB).
PREDICT_CHUNK = 32
# Threads decoding the rows of one request (imagecodecs and cv2 release the GIL); more than the cores only adds switching.
DECODE_WORKERS = min(8, os.cpu_count() or 1)
# A message listing thousands of bad rows helps nobody; the count is always given.
MAX_LISTED_ERRORS = 20
# Request-level limits, checked from the file headers before any image is decoded: one request may
# not buy unbounded CPU. 2,000 rows is ~1 min of decoding full-size films on 2 cores; 1 Gpx is
# ~1,000 films of 1024x1024. Larger jobs go in several requests or through `cxrexp predict`.
DEFAULT_MAX_ROWS = 2000
DEFAULT_MAX_REQUEST_PIXELS = 1024 * 1024 * 1024
# Environment variables that override the logged limits when a model is served (`mlflow models serve`).
MAX_ROWS_ENV = "CXREXP_MAX_ROWS"
MAX_REQUEST_PIXELS_ENV = "CXREXP_MAX_REQUEST_PIXELS"

_DATA_URL_PREFIX = re.compile(r"^data:[^,]{0,200}?;base64,", re.IGNORECASE)


class RowRejected(ValueError):
    """One request row cannot be scored; ``reason`` is short and human (``"not an image"``)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class RequestRejected(ValueError):
    """Some rows of a request cannot be scored; the message lists them (``row 2: not an image``).

    ``errors`` holds every ``"row i: reason"``; the message lists the first ``MAX_LISTED_ERRORS``.
    The pyfunc model turns it into MLflow's INVALID_PARAMETER_VALUE (HTTP 400).
    """

    def __init__(self, message: str, errors: list[str]):
        super().__init__(message)
        self.errors = errors


_SPEC_KEYS = frozenset({"image_spec", "threshold", "positive_label", "negative_label", "max_pixels", "max_bytes",
                        "max_rows", "max_request_pixels"})


@dataclass(frozen=True)
class RequestLimits:
    """What one request may cost a served model (the classifier and the lung segmenter alike).

    Per row: ``max_bytes`` encoded, ``max_pixels`` decoded. Per request: ``max_rows`` rows and
    ``max_request_pixels`` decoded pixels over all rows, both checked from the file headers before
    any image is decoded (``check_request``). Stored with the model; ``with_served_limits`` lets the
    server override the request-level two.
    """

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    max_rows: int = DEFAULT_MAX_ROWS
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS

    def __post_init__(self) -> None:
        if self.max_pixels < MIN_SIDE * MIN_SIDE or self.max_bytes < 1:
            raise ValueError(
                f"max_pixels={self.max_pixels} (minimum {MIN_SIDE * MIN_SIDE}) and "
                f"max_bytes={self.max_bytes} (minimum 1) are too small"
            )
        if self.max_rows < 1 or self.max_request_pixels < MIN_SIDE * MIN_SIDE:
            raise ValueError(f"max_rows={self.max_rows} (minimum 1) and max_request_pixels="
                             f"{self.max_request_pixels} (minimum {MIN_SIDE * MIN_SIDE}) are too small")

    @classmethod
    def from_json_dict(cls, raw: dict[str, Any]) -> RequestLimits:
        """The limits stored in a model's metadata; a key that is absent (an older model) takes its default."""
        return cls(**{f.name: int(raw[f.name]) for f in fields(cls) if f.name in raw})


@dataclass(frozen=True)
class ServingSpec:
    """Everything besides the weights that the served model needs; stored as ``serving_spec.json``."""

    image_spec: ImageSpec
    threshold: float
    positive_label: str = "COVID"
    negative_label: str = "Normal"
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    max_rows: int = DEFAULT_MAX_ROWS  # rows per request
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS  # decoded pixels per request, all rows together
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        clashes = sorted(set(self.extra) & _SPEC_KEYS)
        if clashes:
            raise ValueError(f"extra metadata keys {clashes} would overwrite the serving spec; rename them")
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold)):
            raise ValueError(f"threshold={self.threshold!r} must be a finite number in [0, 1]")
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"threshold={self.threshold} must be in [0, 1] (it cuts a probability)")
        if self.positive_label == self.negative_label:
            raise ValueError(f"positive_label and negative_label are both {self.positive_label!r}")
        self.limits  # noqa: B018  (validates the four limits in their one home)

    @property
    def limits(self) -> RequestLimits:
        return RequestLimits(self.max_pixels, self.max_bytes, self.max_rows, self.max_request_pixels)

    def to_json_dict(self) -> dict[str, Any]:
        out = {
            "image_spec": asdict(self.image_spec),
            "threshold": float(self.threshold),
            "positive_label": self.positive_label,
            "negative_label": self.negative_label,
            **asdict(self.limits),
        }
        out.update(self.extra)
        return out

    @classmethod
    def from_json_dict(cls, raw: dict[str, Any], *, source: str = "serving spec") -> ServingSpec:
        missing = [key for key in ("image_spec", "threshold") if key not in raw]
        if missing:
            raise ValueError(f"{source}: missing keys {missing}; found {sorted(raw)}")
        try:
            image_spec = ImageSpec.from_stored(raw["image_spec"])
        except TypeError as exc:
            raise ValueError(f"{source}: image_spec {raw['image_spec']!r} does not match ImageSpec: {exc}")
        return cls(
            image_spec=image_spec,
            threshold=float(raw["threshold"]),
            positive_label=str(raw.get("positive_label", "COVID")),
            negative_label=str(raw.get("negative_label", "Normal")),
            **asdict(RequestLimits.from_json_dict(raw)),
            extra={k: v for k, v in raw.items() if k not in _SPEC_KEYS},
        )


# ---------------------------------------------------------------------------------------------
# A cell of the request -> bytes -> uint8 SxS
# ---------------------------------------------------------------------------------------------


def _is_missing(value: Any) -> bool:
    if value is None or value is pd.NA:
        return True
    return isinstance(value, float) and math.isnan(value)


def decode_base64_image(text: str, max_bytes: int) -> bytes:
    """Base64 text (standard or URL-safe, padding optional, optional ``data:...;base64,``) -> bytes.

    Strict: any character outside the alphabet is an error (``base64.decodebytes`` would silently
    drop it and hand garbage on). Raises ``RowRejected``.
    """
    text = _DATA_URL_PREFIX.sub("", text.strip(), count=1)
    compact = "".join(text.split())  # MIME-style line breaks are common in pasted base64
    if not compact:
        raise RowRejected("empty base64 string")
    # Reject before allocating: 4 base64 characters carry 3 bytes.
    if len(compact) // 4 * 3 > max_bytes:
        raise RowRejected(
            f"too large: ~{len(compact) // 4 * 3} bytes after base64 decoding (maximum {max_bytes})"
        )
    urlsafe = "-" in compact or "_" in compact
    compact = compact.rstrip("=")
    if len(compact) % 4 == 1:
        raise RowRejected("not base64: truncated (length is not a whole number of bytes)")
    padded = compact + "=" * (-len(compact) % 4)
    try:
        if urlsafe:
            return base64.b64decode(padded.translate(str.maketrans("-_", "+/")), validate=True)
        return base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        raise RowRejected(
            "not base64: send PNG/JPEG bytes, or their base64 text (optionally data:image/...;base64,)"
        ) from None


def row_bytes(value: Any, max_bytes: int) -> bytes:
    """One ``image`` cell (bytes, bytearray, memoryview or base64 str) -> the encoded file's bytes."""
    if _is_missing(value):
        raise RowRejected("missing image (null)")
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    elif isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 1:
        data = value.tobytes()
    elif isinstance(value, str):
        data = decode_base64_image(value, max_bytes)
    else:
        raise RowRejected(
            f"unsupported value of type {type(value).__name__}: send PNG/JPEG bytes or base64 text"
        )
    if not data:
        raise RowRejected("empty file")
    if len(data) > max_bytes:
        raise RowRejected(f"too large: {len(data)} bytes (maximum {max_bytes})")
    return data


def decode_row(value: Any, max_bytes: int, max_pixels: int) -> np.ndarray:
    """One ``image`` cell -> uint8 HxW grey at the file's own size (no resize, no enhancement).

    Raises ``RowRejected`` with the reason (``ImageRejected.reason`` from the decoder).
    """
    from cxrexp.images.decode import ImageRejected, decode_grey

    data = row_bytes(value, max_bytes)
    try:
        return decode_grey(data, max_pixels=max_pixels, min_side=MIN_SIDE)
    except ImageRejected as exc:
        raise RowRejected(str(getattr(exc, "reason", exc))) from None


def reject(errors: list[str], n_rows: int) -> RequestRejected:
    """The one ``RequestRejected`` for a request whose ``errors`` (``"row i: reason"``) are not empty."""
    listed = "; ".join(errors[:MAX_LISTED_ERRORS])
    more = f"; ... and {len(errors) - MAX_LISTED_ERRORS} more" if len(errors) > MAX_LISTED_ERRORS else ""
    return RequestRejected(f"{len(errors)} of {n_rows} rows rejected, nothing was scored: {listed}{more}", errors)


_Limited = TypeVar("_Limited", ServingSpec, RequestLimits)


def with_served_limits(spec: _Limited, environ: dict[str, str] | None = None) -> _Limited:
    """``spec`` (a ``ServingSpec`` or ``RequestLimits``) with the request limits set where the model is
    served (``CXREXP_MAX_ROWS``, ``CXREXP_MAX_REQUEST_PIXELS``), else as logged. A value that is not a positive integer is an error
    naming the variable: a typo must not silently lift a limit."""
    from dataclasses import replace

    environ = os.environ if environ is None else environ
    changes = {}
    for name, field_name in ((MAX_ROWS_ENV, "max_rows"), (MAX_REQUEST_PIXELS_ENV, "max_request_pixels")):
        text = environ.get(name, "").strip()
        if text:
            try:
                changes[field_name] = int(text)
            except ValueError:
                raise ValueError(f"{name}={text!r} is not a whole number (a limit per request)") from None
    return replace(spec, **changes) if changes else spec


def check_request(values: list[Any], limits: RequestLimits) -> list[Any]:
    """Enforce the request-level limits before any pixel is decoded; returns the cells with base64
    already turned into bytes (rows that fail here keep their value: the row path reports why).

    Rows beyond ``limits.max_rows``, or a sum of width x height read from the file headers
    (``decode.header_size``) beyond ``limits.max_request_pixels``, reject the whole request naming the
    limit and how to stay within it.
    """
    from cxrexp.images.decode import ImageRejected, header_size

    if len(values) > limits.max_rows:
        raise RequestRejected(
            f"request has {len(values)} rows, more than the limit of {limits.max_rows} rows per request (max_rows): "
            "send the images in several requests", [f"request: {len(values)} rows > max_rows {limits.max_rows}"])
    out: list[Any] = []
    total = 0
    for value in values:
        try:
            data = row_bytes(value, limits.max_bytes)
        except RowRejected:
            out.append(value)
            continue
        out.append(data)
        try:
            _, width, height = header_size(data)
        except ImageRejected:
            continue
        total += int(width) * int(height)
    if total > limits.max_request_pixels:
        raise RequestRejected(
            f"request holds {total} pixels in all, more than the limit of {limits.max_request_pixels} per request "
            "(max_request_pixels): send fewer or smaller images per request",
            [f"request: {total} pixels > max_request_pixels {limits.max_request_pixels}"])
    return out


class RequestTimedOut(TimeoutError):
    """The request's time ran out; the rows not yet decoded were not started."""


@dataclass(frozen=True)
class Deadline:
    """When a request's work must stop: ``seconds`` after ``started`` on ``clock`` (monotonic).

    Why: the scoring server answers 504 when a request outlives its timeout but leaves ``predict``
    running; a request of thousands of large images would go on decoding for nobody. Checked before
    each row is decoded and each chunk is run, so at most one image per decode thread (and one
    chunk) is finished after the time is up.
    """

    seconds: float
    started: float = field(default_factory=time.monotonic)
    clock: Callable[[], float] = time.monotonic

    def check(self) -> None:
        if self.clock() - self.started > self.seconds:
            raise RequestTimedOut(
                f"the request took longer than its timeout of {self.seconds:g} s; its remaining rows were not "
                "decoded (send fewer or smaller images per request, or raise MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT)"
            )


def check_deadline(deadline: Deadline | None) -> None:
    """``deadline.check()``, or nothing without a deadline (in-process callers have none)."""
    if deadline is not None:
        deadline.check()


def prepare_row(value: Any, spec: ServingSpec) -> np.ndarray:
    """One ``image`` cell -> uint8 (S, S), exactly as the training set was prepared.

    Raises ``RowRejected`` with the reason (``ImageRejected.reason`` from the decoder).
    """
    from cxrexp.images.transforms import prepare

    return prepare(decode_row(value, spec.max_bytes, spec.max_pixels), spec.image_spec)


def _prepare_into(batch: np.ndarray, row: int, value: Any, spec: ServingSpec,
                  deadline: Deadline | None = None) -> str | None:
    """Write row ``row`` of the uint8 ``batch``; the rejection reason, or None when the row is fine.
    Raises RequestTimedOut, without decoding, once ``deadline`` has passed."""
    check_deadline(deadline)
    try:
        batch[row] = prepare_row(value, spec)
    except RowRejected as exc:
        return exc.reason
    return None


def prepare_chunks(
    images: pd.Series | list[Any], spec: ServingSpec, chunk_rows: int = PREDICT_CHUNK, *, workers: int | None = None,
    deadline: Deadline | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Request cells -> ``(start, float32 (n, S, S, 1) in [0, 1])`` for rows ``start .. start + n - 1``.

    Chunks of ``chunk_rows`` rows come in row order as soon as their rows are decoded, while up to
    ``workers`` threads (default ``DECODE_WORKERS``) go on decoding the later rows: the decoders
    (imagecodecs for PNG, OpenCV for JPEG), resize and CLAHE release the GIL, so decoding uses the
    cores the model leaves idle, and the caller's forward pass on one chunk overlaps the decoding of
    the next (measured in
    benchmarks/bench_train.py). After the first bad row no further chunk is yielded; every row is
    still checked and, when any was bad, one ``RequestRejected`` listing them all is raised at the
    end. The pixels do not depend on ``workers`` or ``chunk_rows``. Past ``deadline`` it raises
    ``RequestTimedOut`` and the rows not yet started are never decoded.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows} must be at least 1")
    values = check_request(list(images), spec.limits)
    size = spec.image_spec.image_size
    pixels = np.empty((len(values), size, size), dtype=np.uint8)
    n_workers = max(1, min(len(values), DECODE_WORKERS if workers is None else workers))
    # A pool per request, not per process: nothing is left running when a server forks workers.
    pool = ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="cxrexp-decode") if n_workers > 1 else None
    errors: list[str] = []
    try:
        if pool is not None:
            futures = [pool.submit(_prepare_into, pixels, row, value, spec, deadline) for row, value in enumerate(values)]
            reasons = (future.result() for future in futures)
        else:
            reasons = (_prepare_into(pixels, row, value, spec, deadline) for row, value in enumerate(values))
        for start in range(0, len(values), chunk_rows):
            stop = min(start + chunk_rows, len(values))
            for row in range(start, stop):
                reason = next(reasons)
                if reason is not None:
                    errors.append(f"row {row}: {reason}")
            if not errors:
                check_deadline(deadline)  # the caller's forward pass on the previous chunk counts too
                # The same float32 division as the training pipeline's x / 255.
                yield start, pixels[start:stop].astype(np.float32)[..., None] / np.float32(255.0)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    if errors:
        raise reject(errors, len(values))


def prepare_batch(images: pd.Series | list[Any], spec: ServingSpec, *, workers: int | None = None) -> np.ndarray:
    """Request cells -> float32 (N, S, S, 1) in [0, 1]; every bad row listed in one ``RequestRejected``.

    All rows at once (``prepare_chunks`` with one chunk); decoded by up to ``workers`` threads.
    """
    values = list(images)
    size = spec.image_spec.image_size
    chunks = [chunk for _, chunk in prepare_chunks(values, spec, max(1, len(values)), workers=workers)]
    return chunks[0] if chunks else np.empty((0, size, size, 1), dtype=np.float32)


def label_probabilities(probabilities: np.ndarray, spec: ServingSpec,
                        lung_crop: np.ndarray | None = None) -> pd.DataFrame:
    """float (N,) in [0, 1] -> DataFrame(probability float64, label str, lung_crop bool); positive
    when p >= threshold; ``lung_crop`` says per row whether a lung crop was applied (all False for a
    model trained without one)."""
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    labels = np.where(probabilities >= spec.threshold, spec.positive_label, spec.negative_label)
    crop = np.zeros(len(probabilities), dtype=bool) if lung_crop is None else np.asarray(lung_crop, dtype=bool)
    return pd.DataFrame({"probability": probabilities, "label": labels.astype(object), "lung_crop": crop})


def example_png(size: int = 48) -> bytes:
    """A small 8-bit grey PNG (a vertical gradient with a bright disc), for input examples and tests."""
    import cv2

    rows = np.linspace(0, 200, size, dtype=np.float32)[:, None]
    image = np.repeat(rows, size, axis=1)
    yy, xx = np.mgrid[:size, :size]
    image[(yy - size / 2) ** 2 + (xx - size / 3) ** 2 < (size / 5) ** 2] = 255
    ok, encoded = cv2.imencode(".png", image.astype(np.uint8))
    if not ok:
        raise RuntimeError("OpenCV could not encode the example PNG")
    return encoded.tobytes()


__all__ = [
    "DECODE_WORKERS",
    "Deadline",
    "RequestTimedOut",
    "check_deadline",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_REQUEST_PIXELS",
    "DEFAULT_MAX_ROWS",
    "INPUT_COLUMN",
    "MAX_REQUEST_PIXELS_ENV",
    "MAX_ROWS_ENV",
    "MAX_LISTED_ERRORS",
    "MIN_SIDE",
    "PREDICT_CHUNK",
    "RequestRejected",
    "RowRejected",
    "ServingSpec",
    "RequestLimits",
    "check_request",
    "decode_base64_image",
    "example_png",
    "label_probabilities",
    "prepare_batch",
    "prepare_chunks",
    "decode_row",
    "prepare_row",
    "reject",
    "row_bytes",
    "with_served_limits",
]
