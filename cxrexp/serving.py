"""The raw-image pyfunc model: PNG/JPEG bytes in, P(COVID) and a label out (MLflow edge).

The served model carries its own preprocessing: every request row goes through the very functions
that built the training set (``preprocess.decode_grey`` then ``preprocess.prepare``) with the
``ImageSpec`` stored beside the Keras weights, so a client never resizes, enhances or normalises.

Request (``pandas.DataFrame``, one row per image):
    ``image``  PNG/JPEG file bytes, or their base64 text (standard or URL-safe alphabet, padding
               optional, an optional ``data:image/png;base64,`` prefix). Any size, 1/3/4 channels,
               8 or 16 bits. REST callers send ``{"dataframe_records": [{"image": "<base64>"}]}``.
Response (``pandas.DataFrame``, same row order):
    ``probability``  float64 in [0, 1], P(positive class)
    ``label``        the positive label when ``probability >= threshold``, else the negative label

A request with any bad row fails whole, with ``INVALID_PARAMETER_VALUE`` (HTTP 400 from the MLflow
scoring server) and a message listing every bad row (``row 2: not an image``): a client never gets
silent NaNs mixed into good answers.

Signature: ``image`` is declared ``string``, not ``binary``. For a ``binary`` column the scoring
server base64-decodes JSON values itself, before the model sees them, with the lenient
``base64.decodebytes``: a ``data:`` prefix then fails (or silently corrupts the bytes) and bad base64
comes back as a type-conversion error that names no row. With ``string`` the text reaches
``predict`` untouched, and schema enforcement passes an object column of raw ``bytes`` through too,
so Python callers can send file bytes directly.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import math
import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Iterator

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from mlflow.types.schema import ColSpec, Schema, TensorSpec

from cxrexp.config import ImageSpec

# Artifact keys inside the pyfunc model (the files live under artifacts/ in the model folder).
KERAS_ARTIFACT = "keras_model"
SPEC_ARTIFACT = "serving_spec"
SPEC_FILE_NAME = "serving_spec.json"
KERAS_FILE_NAME = "model.keras"
MODEL_SCRIPT_NAME = "raw_image_model.py"
_MODEL_SCRIPT = (
    '"""MLflow models-from-code entry: the cxrexp raw-image classifier."""\n'
    "import mlflow\n"
    "from cxrexp.serving import RawImageClassifier\n"
    "mlflow.models.set_model(RawImageClassifier())\n"
)
KERAS_FLAVOUR_NAME = "keras_model"  # the optional second model of the run: mlflow.keras flavour

INPUT_COLUMN = "image"
# 64 MiB: a 16-bit 4k x 4k PNG is ~32 MiB; anything bigger is more likely abuse than an X-ray.
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_PIXELS = 64_000_000  # PreprocessConfig.max_pixels
MIN_SIDE = 32
# Rows per forward pass: bounds memory for big requests (1024 px x 32 x 4 B = 128 MiB).
PREDICT_CHUNK = 32
# Threads decoding the rows of one request (imagecodecs and cv2 release the GIL); more than the cores only adds switching.
DECODE_WORKERS = min(8, os.cpu_count() or 1)
# A message listing thousands of bad rows helps nobody; the count is always given.
MAX_LISTED_ERRORS = 20

# What the served model imports (cxrexp/serving.py -> preprocess.py, config.py), pinned at log time.
SERVING_DISTRIBUTIONS = (
    "mlflow",
    "tensorflow",
    "keras",
    "opencv-python-headless",
    "imagecodecs",
    "pillow",
    "numpy",
    "pandas",
    "imagehash",
)

_DATA_URL_PREFIX = re.compile(r"^data:[^,]{0,200}?;base64,", re.IGNORECASE)
_PACKAGE_DIR = Path(__file__).resolve().parent


class ModelNotFound(ValueError):
    """A model URI that resolves to nothing usable; the message names the URI and what exists."""


class RowRejected(ValueError):
    """One request row cannot be scored; ``reason`` is short and human (``"not an image"``)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


_SPEC_KEYS = frozenset({"image_spec", "threshold", "positive_label", "negative_label", "max_pixels", "max_bytes"})


@dataclass(frozen=True)
class ServingSpec:
    """Everything besides the weights that the served model needs; stored as ``serving_spec.json``."""

    image_spec: ImageSpec
    threshold: float
    positive_label: str = "COVID"
    negative_label: str = "Normal"
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
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
        if self.max_pixels < MIN_SIDE * MIN_SIDE or self.max_bytes < 1:
            raise ValueError(
                f"max_pixels={self.max_pixels} (minimum {MIN_SIDE * MIN_SIDE}) and "
                f"max_bytes={self.max_bytes} (minimum 1) are too small"
            )

    def to_json_dict(self) -> dict[str, Any]:
        out = {
            "image_spec": asdict(self.image_spec),
            "threshold": float(self.threshold),
            "positive_label": self.positive_label,
            "negative_label": self.negative_label,
            "max_pixels": int(self.max_pixels),
            "max_bytes": int(self.max_bytes),
        }
        out.update(self.extra)
        return out

    @classmethod
    def from_json_dict(cls, raw: dict[str, Any], *, source: str = "serving spec") -> ServingSpec:
        missing = [key for key in ("image_spec", "threshold") if key not in raw]
        if missing:
            raise ValueError(f"{source}: missing keys {missing}; found {sorted(raw)}")
        try:
            image_spec = ImageSpec(**raw["image_spec"])
        except TypeError as exc:
            raise ValueError(f"{source}: image_spec {raw['image_spec']!r} does not match ImageSpec: {exc}")
        return cls(
            image_spec=image_spec,
            threshold=float(raw["threshold"]),
            positive_label=str(raw.get("positive_label", "COVID")),
            negative_label=str(raw.get("negative_label", "Normal")),
            max_pixels=int(raw.get("max_pixels", DEFAULT_MAX_PIXELS)),
            max_bytes=int(raw.get("max_bytes", DEFAULT_MAX_BYTES)),
            extra={k: v for k, v in raw.items() if k not in _SPEC_KEYS},
        )


# ---------------------------------------------------------------------------------------------
# Pure request handling (no Keras): a cell of the request -> bytes -> uint8 SxS
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


def prepare_row(value: Any, spec: ServingSpec) -> np.ndarray:
    """One ``image`` cell -> uint8 (S, S), exactly as the training set was prepared.

    Raises ``RowRejected`` with the reason (``ImageRejected.reason`` from the decoder).
    """
    from cxrexp.preprocess import ImageRejected, decode_grey, prepare

    data = row_bytes(value, spec.max_bytes)
    try:
        grey = decode_grey(data, max_pixels=spec.max_pixels, min_side=MIN_SIDE)
    except ImageRejected as exc:
        raise RowRejected(str(getattr(exc, "reason", exc))) from None
    return prepare(grey, spec.image_spec)


def _prepare_into(batch: np.ndarray, row: int, value: Any, spec: ServingSpec) -> str | None:
    """Write row ``row`` of the uint8 ``batch``; the rejection reason, or None when the row is fine."""
    try:
        batch[row] = prepare_row(value, spec)
    except RowRejected as exc:
        return exc.reason
    return None


def prepare_chunks(
    images: pd.Series | list[Any], spec: ServingSpec, chunk_rows: int = PREDICT_CHUNK, *, workers: int | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """Request cells -> ``(start, float32 (n, S, S, 1) in [0, 1])`` for rows ``start .. start + n - 1``.

    Chunks of ``chunk_rows`` rows come in row order as soon as their rows are decoded, while up to
    ``workers`` threads (default ``DECODE_WORKERS``) go on decoding the later rows: the decoders
    (imagecodecs for PNG, OpenCV for JPEG), resize and CLAHE release the GIL, so decoding uses the
    cores the model leaves idle, and the caller's forward pass on one chunk overlaps the decoding of
    the next (measured in
    benchmarks/bench_train.py). After the first bad row no further chunk is yielded; every row is
    still checked and, when any was bad, one ``MlflowException`` (INVALID_PARAMETER_VALUE) listing
    them all is raised at the end. The pixels do not depend on ``workers`` or ``chunk_rows``.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows} must be at least 1")
    values = list(images)
    size = spec.image_spec.image_size
    pixels = np.empty((len(values), size, size), dtype=np.uint8)
    n_workers = max(1, min(len(values), DECODE_WORKERS if workers is None else workers))
    # A pool per request, not per process: nothing is left running when a server forks workers.
    pool = ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="cxrexp-decode") if n_workers > 1 else None
    errors: list[str] = []
    try:
        if pool is not None:
            futures = [pool.submit(_prepare_into, pixels, row, value, spec) for row, value in enumerate(values)]
            reasons = (future.result() for future in futures)
        else:
            reasons = (_prepare_into(pixels, row, value, spec) for row, value in enumerate(values))
        for start in range(0, len(values), chunk_rows):
            stop = min(start + chunk_rows, len(values))
            for row in range(start, stop):
                reason = next(reasons)
                if reason is not None:
                    errors.append(f"row {row}: {reason}")
            if not errors:
                # The same float32 division as the training pipeline's x / 255.
                yield start, pixels[start:stop].astype(np.float32)[..., None] / np.float32(255.0)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    if errors:
        listed = "; ".join(errors[:MAX_LISTED_ERRORS])
        more = f"; ... and {len(errors) - MAX_LISTED_ERRORS} more" if len(errors) > MAX_LISTED_ERRORS else ""
        raise MlflowException(
            f"{len(errors)} of {len(values)} rows rejected, nothing was scored: {listed}{more}",
            error_code=INVALID_PARAMETER_VALUE,
        )


def prepare_batch(images: pd.Series | list[Any], spec: ServingSpec, *, workers: int | None = None) -> np.ndarray:
    """Request cells -> float32 (N, S, S, 1) in [0, 1]; every bad row listed in one ``MlflowException``.

    All rows at once (``prepare_chunks`` with one chunk); decoded by up to ``workers`` threads.
    """
    values = list(images)
    size = spec.image_spec.image_size
    chunks = [chunk for _, chunk in prepare_chunks(values, spec, max(1, len(values)), workers=workers)]
    return chunks[0] if chunks else np.empty((0, size, size, 1), dtype=np.float32)


def label_probabilities(probabilities: np.ndarray, spec: ServingSpec) -> pd.DataFrame:
    """float (N,) in [0, 1] -> DataFrame(probability float64, label str); positive when p >= threshold."""
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    labels = np.where(probabilities >= spec.threshold, spec.positive_label, spec.negative_label)
    return pd.DataFrame({"probability": probabilities, "label": labels.astype(object)})


# ---------------------------------------------------------------------------------------------
# The pyfunc model
# ---------------------------------------------------------------------------------------------


class RawImageClassifier(mlflow.pyfunc.PythonModel):
    """Raw PNG/JPEG -> P(positive) and label, with the training preprocessing built in.

    After ``load_context``: ``keras_model`` (input float32 (S, S, 1) in [0, 1], output sigmoid (1,))
    and ``serving_spec`` (``ServingSpec``).
    """

    def __init__(self) -> None:
        self.keras_model = None
        self.serving_spec: ServingSpec | None = None

    def load_context(self, context) -> None:
        import keras

        spec_path = Path(context.artifacts[SPEC_ARTIFACT])
        self.serving_spec = ServingSpec.from_json_dict(
            json.loads(spec_path.read_text(encoding="utf-8")), source=str(spec_path)
        )
        self.keras_model = keras.saving.load_model(context.artifacts[KERAS_ARTIFACT], compile=False)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if self.keras_model is None or self.serving_spec is None:
            raise MlflowException(
                "RawImageClassifier.predict called before load_context: load it with mlflow.pyfunc.load_model",
                error_code=INTERNAL_ERROR,
            )
        spec = self.serving_spec
        if not isinstance(model_input, pd.DataFrame):
            raise MlflowException(
                f"expected a DataFrame with an {INPUT_COLUMN!r} column, got {type(model_input).__name__}",
                error_code=INVALID_PARAMETER_VALUE,
            )
        if INPUT_COLUMN not in model_input.columns:
            raise MlflowException(
                f"missing column {INPUT_COLUMN!r} (got {list(map(str, model_input.columns))}): send one "
                f"row per image with PNG/JPEG bytes or base64 text in {INPUT_COLUMN!r}",
                error_code=INVALID_PARAMETER_VALUE,
            )
        probabilities = np.empty(len(model_input), dtype=np.float64)
        # Each chunk's forward pass runs while the decode threads prepare the next chunks; a bad row
        # anywhere raises (listing every bad row) before anything is returned. closing(): if the
        # model raises, the generator's decode pool is shut down at once.
        with contextlib.closing(prepare_chunks(model_input[INPUT_COLUMN], spec, PREDICT_CHUNK)) as chunks:
            for start, chunk in chunks:
                # predict_on_batch: Keras' compiled (tf.function) predict step, without model.predict's
                # progress bar and per-call tf.data pipeline; about twice as fast as an eager
                # self.keras_model(chunk) call, which dispatches every layer's ops one by one.
                probabilities[start : start + len(chunk)] = np.asarray(
                    self.keras_model.predict_on_batch(chunk), dtype=np.float64
                ).reshape(-1)
        bad = np.flatnonzero(~np.isfinite(probabilities))
        if bad.size:
            raise MlflowException(
                f"the model produced non-finite probabilities for rows {bad.tolist()[:MAX_LISTED_ERRORS]}; "
                "its weights are probably broken (retrain or roll back the model)",
                error_code=INTERNAL_ERROR,
            )
        return label_probabilities(probabilities, spec)


# ---------------------------------------------------------------------------------------------
# Logging and loading
# ---------------------------------------------------------------------------------------------


def serving_signature() -> ModelSignature:
    """``image`` string (bytes pass schema enforcement too) -> ``probability`` double, ``label`` string."""
    return ModelSignature(
        inputs=Schema([ColSpec("string", INPUT_COLUMN)]),
        outputs=Schema([ColSpec("double", "probability"), ColSpec("string", "label")]),
    )


def keras_signature(image_size: int) -> ModelSignature:
    """The bare Keras model: float32 (-1, S, S, 1) ``image`` in [0, 1] -> float32 (-1, 1) ``probability``."""
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, image_size, image_size, 1), INPUT_COLUMN)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1), "probability")]),
    )


def pinned_requirements(distributions: tuple[str, ...] = SERVING_DISTRIBUTIONS) -> list[str]:
    """``["mlflow==3.17.2", ...]`` from the installed versions; an absent distribution stays unpinned."""
    out = []
    for name in distributions:
        try:
            out.append(f"{name}=={importlib_metadata.version(name)}")
        except importlib_metadata.PackageNotFoundError:
            out.append(name)
    return out


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


def log_raw_image_model(
    keras_model,
    spec: ImageSpec,
    threshold: float,
    *,
    name: str = "model",
    registered_model_name: str | None = None,
    input_example_png: bytes | None = None,
    extra_metadata: dict | None = None,
    positive_label: str = "COVID",
    negative_label: str = "Normal",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    keras_flavour_name: str | None = KERAS_FLAVOUR_NAME,
) -> ModelInfo:
    """Log ``keras_model`` as the raw-image pyfunc model in the active run; returns MLflow's ``ModelInfo``.

    ``keras_model``: input float32 (S, S, 1) in [0, 1] with S == ``spec.image_size``, output (1,)
    sigmoid. ``threshold`` in [0, 1] cuts the probability into labels. ``extra_metadata`` (JSON
    values) goes into the MLmodel metadata and the serving spec beside the spec and threshold.

    Unless ``keras_flavour_name`` is None, the bare Keras model is also logged (``mlflow.keras``, about
    0.2 s, one more copy of the weights) as a second model of the run, *before* the pyfunc model so
    that ``mlflow.last_logged_model()`` is the served one. Only the pyfunc model is registered.
    """
    if mlflow.active_run() is None:
        raise RuntimeError("log_raw_image_model needs an active run: call it inside `with mlflow.start_run():`")
    input_shape = tuple(keras_model.inputs[0].shape[1:])
    if input_shape != (spec.image_size, spec.image_size, 1):
        raise ValueError(
            f"the Keras model expects input {input_shape} but spec.image_size={spec.image_size} "
            f"gives ({spec.image_size}, {spec.image_size}, 1): log it with the ImageSpec it was trained on"
        )
    serving_spec = ServingSpec(
        image_spec=spec,
        threshold=float(threshold),
        positive_label=positive_label,
        negative_label=negative_label,
        max_pixels=max_pixels,
        max_bytes=max_bytes,
        extra=dict(extra_metadata or {}),
    )
    example_bytes = input_example_png if input_example_png is not None else example_png()
    # Check the example here: MLflow would only log a warning when it fails to predict on it.
    prepare_row(example_bytes, serving_spec)
    input_example = pd.DataFrame({INPUT_COLUMN: [base64.b64encode(example_bytes).decode("ascii")]})

    requirements = pinned_requirements()
    if keras_flavour_name:
        mlflow.keras.log_model(
            keras_model,
            name=keras_flavour_name,
            signature=keras_signature(spec.image_size),
            pip_requirements=requirements,
            metadata={"cxrexp_serving": serving_spec.to_json_dict()},
        )
    with tempfile.TemporaryDirectory(prefix="cxrexp-serving-") as tmp:
        keras_path = Path(tmp) / KERAS_FILE_NAME
        spec_path = Path(tmp) / SPEC_FILE_NAME
        keras_model.save(keras_path)
        spec_path.write_text(json.dumps(serving_spec.to_json_dict(), indent=2), encoding="utf-8")
        # Models from code, not a cloudpickled instance: nothing is unpickled at load time and the
        # class is whatever cxrexp/serving.py says in the model's own code/ copy.
        model_script = Path(tmp) / MODEL_SCRIPT_NAME
        model_script.write_text(_MODEL_SCRIPT, encoding="utf-8")
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(model_script),
            artifacts={KERAS_ARTIFACT: str(keras_path), SPEC_ARTIFACT: str(spec_path)},
            code_paths=[str(_PACKAGE_DIR)],
            signature=serving_signature(),
            input_example=input_example,
            pip_requirements=requirements,
            registered_model_name=registered_model_name,
            metadata={"cxrexp_serving": serving_spec.to_json_dict()},
        )


def _describe_what_exists(model_uri: str) -> str:
    """Best effort: what the URI's scheme could have pointed at (registered models, a run's models)."""
    try:
        client = mlflow.MlflowClient()
        if model_uri.startswith("models:/"):
            rest = model_uri[len("models:/") :]
            name = rest.split("/")[0].split("@")[0]
            # models:/m-<id> is an MLflow 3 logged-model id, not a registered name.
            if name.startswith("m-") and "/" not in rest and "@" not in rest:
                return "no logged model with that id in the tracking store"
            models = client.search_registered_models(max_results=50)
            if name not in {m.name for m in models}:
                names = sorted(m.name for m in models)
                return f"registered models: {names or 'none'}"
            versions = client.search_model_versions(f"name='{name}'", max_results=50)
            aliases = sorted({a for m in models if m.name == name for a in (m.aliases or {})})
            return (
                f"versions of {name!r}: {sorted(int(v.version) for v in versions)}, aliases: {aliases or 'none'}"
            )
        if model_uri.startswith("runs:/"):
            run_id = model_uri[len("runs:/") :].split("/")[0]
            try:
                run = client.get_run(run_id)
            except MlflowException:
                return f"no run {run_id!r} in the tracking store {mlflow.get_tracking_uri()}"
            logged = [m.name for m in mlflow.search_logged_models(
                experiment_ids=[run.info.experiment_id],
                filter_string=f"source_run_id = '{run_id}'",
                output_format="list",
            )]
            return f"models logged by run {run_id}: {logged or 'none'}"
        path = Path(model_uri.removeprefix("file://"))
        if not path.exists():
            return f"the path {path} does not exist"
        if not (path / "MLmodel").exists():
            return f"{path} has no MLmodel file (contents: {sorted(p.name for p in path.iterdir())[:20]})"
    except Exception as exc:  # the description is a courtesy: never mask the real error with it
        return f"could not list what exists ({type(exc).__name__}: {exc})"
    return "see the tracking store"


def load_keras_model(model_uri: str):
    """A raw-image model URI -> ``(keras.Model, ImageSpec, threshold)`` for evaluation and Grad-CAM.

    The Keras model takes float32 (N, S, S, 1) in [0, 1] and returns (N, 1) probabilities; its
    layers (``block{i}_conv``, ``logit``) are reachable. Raises ``ModelNotFound`` when the URI
    resolves to no model, or to one that is not a ``RawImageClassifier``.
    """
    try:
        pyfunc_model = mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError) as exc:
        raise ModelNotFound(
            f"no model at {model_uri!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); "
            f"{_describe_what_exists(model_uri)}"
        ) from exc
    try:
        python_model = pyfunc_model.unwrap_python_model()
    except MlflowException as exc:
        raise ModelNotFound(
            f"{model_uri!r} is a {pyfunc_model.loader_module} model, not a cxrexp raw-image model "
            "(log one with cxrexp.serving.log_raw_image_model)"
        ) from exc
    # Duck-typed: the class may come from the model's own code copy rather than this module.
    if not (hasattr(python_model, "keras_model") and hasattr(python_model, "serving_spec")):
        raise ModelNotFound(
            f"{model_uri!r} wraps {type(python_model).__name__}, not RawImageClassifier "
            "(log one with cxrexp.serving.log_raw_image_model)"
        )
    spec = python_model.serving_spec
    return python_model.keras_model, spec.image_spec, float(spec.threshold)


__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "KERAS_FLAVOUR_NAME",
    "ModelNotFound",
    "RawImageClassifier",
    "RowRejected",
    "ServingSpec",
    "decode_base64_image",
    "example_png",
    "keras_signature",
    "label_probabilities",
    "load_keras_model",
    "log_raw_image_model",
    "pinned_requirements",
    "prepare_batch",
    "prepare_chunks",
    "prepare_row",
    "row_bytes",
    "serving_signature",
]
