"""The raw-image pyfunc model: PNG/JPEG bytes in, P(COVID) and a label out (MLflow edge).

The served model carries its own preprocessing: every request row goes through the very functions
that built the training set (``preprocess.decode_grey`` then ``preprocess.prepare``) with the
``ImageSpec`` stored beside the Keras weights, so a client never resizes, enhances or normalises.
That half (decoding rows, ``ServingSpec``, labels) is pure and lives in ``request_images``; this
module holds the MLflow half: the pyfunc class, its signature, logging and loading.

Request (``pandas.DataFrame``, one row per image):
    ``image``  PNG/JPEG file bytes, or their base64 text (standard or URL-safe alphabet, padding
               optional, an optional ``data:image/png;base64,`` prefix). Any size, 1/3/4 channels,
               8 or 16 bits. REST callers send ``{"dataframe_records": [{"image": "<base64>"}]}``.
Response (``pandas.DataFrame``, same row order):
    ``probability``  float64 in [0, 1], P(positive class)
    ``label``        the positive label when ``probability >= threshold``, else the negative label
    ``lung_crop``    bool: the row was cropped to its lungs (False for a model trained on whole
                     images, and for a row whose lung mask was implausible: then the whole image)

A model trained on lung views (``ImageSpec.lungs`` crop or mask) carries the segmenter that cut its
training images, and runs it on every row before cropping (``request_images.prepare_lung_rows``).

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
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.protos.databricks_pb2 import (
    INTERNAL_ERROR,
    INVALID_PARAMETER_VALUE,
)
from mlflow.types.schema import AnyType, ColSpec, Schema, TensorSpec

import cxrexp
from cxrexp.config import ImageSpec
from cxrexp.errors import ModelNotFound
from cxrexp.images.request_images import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_REQUEST_PIXELS,
    DEFAULT_MAX_ROWS,
    INPUT_COLUMN,
    MAX_LISTED_ERRORS,
    PREDICT_CHUNK,
    Deadline,
    RequestRejected,
    ServingSpec,
    example_png,
    label_probabilities,
    prepare_chunks,
    prepare_row,
    with_served_limits,
)
from cxrexp.lungs.request_views import prepare_lung_rows
from cxrexp.mlflow_edge.model_uri import describe_what_exists
from cxrexp.mlflow_edge.served_errors import guarded_predict
from cxrexp.tags import SERVING_METADATA_KEY

# Artifact keys inside the pyfunc model (the files live under artifacts/ in the model folder).
KERAS_ARTIFACT = "keras_model"
SPEC_ARTIFACT = "serving_spec"
SPEC_FILE_NAME = "serving_spec.json"
KERAS_FILE_NAME = "model.keras"
# Models trained on lung views carry the segmenter whose masks cut their training images.
SEGMENTER_ARTIFACT = "lung_segmenter"
SEGMENTER_FILE_NAME = "lung_segmenter.keras"
MODEL_SCRIPT_NAME = "raw_image_model.py"
_MODEL_SCRIPT = (
    '"""MLflow models-from-code entry: the cxrexp raw-image classifier."""\n'
    "import mlflow\n"
    "from cxrexp.mlflow_edge.serving import RawImageClassifier\n"
    "mlflow.models.set_model(RawImageClassifier())\n"
)
KERAS_FLAVOUR_NAME = "keras_model"  # the optional second model of the run: mlflow.keras flavour

# What the served model imports (cxrexp/serving.py -> request_images.py -> preprocess.py, config.py),
# pinned at log time.
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

_PACKAGE_DIR = Path(cxrexp.__file__).resolve().parent  # the whole package, logged as the model's code


# ---------------------------------------------------------------------------------------------
# The pyfunc model
# ---------------------------------------------------------------------------------------------


def served_deadline(environ: dict[str, str] | None = None) -> Deadline | None:
    """Inside ``mlflow models serve``: the request's deadline, from MLflow's own request timeout
    (``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT``, 60 s by default), after which the server has answered
    504 and nobody waits for the result. None in-process (``cxrexp predict``, evaluation): no limit."""
    from mlflow.environment_variables import (
        _MLFLOW_IS_IN_SERVING_ENVIRONMENT,
        MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT,
    )

    environ = os.environ if environ is None else environ
    if str(environ.get(_MLFLOW_IS_IN_SERVING_ENVIRONMENT.name, "")).lower() != "true":
        return None
    raw = environ.get(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.name)
    try:
        seconds = float(raw) if raw not in (None, "") else float(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.default)
    except ValueError:
        seconds = float(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.default)
    return Deadline(seconds)


class RawImageClassifier(mlflow.pyfunc.PythonModel):
    """Raw PNG/JPEG -> P(positive) and label, with the training preprocessing built in.

    After ``load_context``: ``keras_model`` (input float32 (S, S, 1) in [0, 1], output sigmoid (1,))
    and ``serving_spec`` (``ServingSpec``).
    """

    def __init__(self) -> None:
        self.keras_model = None
        self.serving_spec: ServingSpec | None = None
        self.segmenter = None  # the lung U-Net, for models trained on lung views

    def load_context(self, context) -> None:
        import keras

        spec_path = Path(context.artifacts[SPEC_ARTIFACT])
        # The limits as logged, unless the server sets CXREXP_MAX_ROWS / CXREXP_MAX_REQUEST_PIXELS.
        self.serving_spec = with_served_limits(ServingSpec.from_json_dict(
            json.loads(spec_path.read_text(encoding="utf-8")), source=str(spec_path)
        ))
        self.keras_model = keras.saving.load_model(context.artifacts[KERAS_ARTIFACT], compile=False)
        if self.serving_spec.image_spec.lungs != "none":
            if SEGMENTER_ARTIFACT not in context.artifacts:
                raise MlflowException(
                    f"the model was trained on lungs={self.serving_spec.image_spec.lungs} views but carries no "
                    f"{SEGMENTER_ARTIFACT!r} artifact: log it again with log_raw_image_model(segmenter=...)",
                    error_code=INTERNAL_ERROR,
                )
            self.segmenter = keras.saving.load_model(context.artifacts[SEGMENTER_ARTIFACT], compile=False)

    def lung_masks(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """The carried segmenter's masks, each at its image's size (``lungs.segmenter.predict_masks``)."""
        from cxrexp.lungs.segmenter import predict_masks

        return predict_masks(self.segmenter, images)

    def _predict_lung_views(self, cells: pd.Series, deadline: Deadline | None) -> tuple[np.ndarray, np.ndarray]:
        rows = prepare_lung_rows(cells, self.serving_spec, self.lung_masks, chunk_rows=PREDICT_CHUNK, deadline=deadline)
        probabilities = np.empty(len(rows.pixels), dtype=np.float64)
        for start in range(0, len(rows.pixels), PREDICT_CHUNK):
            chunk = rows.pixels[start : start + PREDICT_CHUNK]
            probabilities[start : start + len(chunk)] = np.asarray(
                self.keras_model.predict_on_batch(chunk), dtype=np.float64).reshape(-1)
        return probabilities, rows.applied

    @guarded_predict
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
        lung_crop = None
        # Each chunk's forward pass runs while the decode threads prepare the next chunks; a bad row
        # anywhere raises (listing every bad row) before anything is returned. closing(): if the
        # model raises, the generator's decode pool is shut down at once.
        deadline = served_deadline()
        try:
            if self.segmenter is not None:
                probabilities, lung_crop = self._predict_lung_views(model_input[INPUT_COLUMN], deadline)
            else:
                with contextlib.closing(prepare_chunks(model_input[INPUT_COLUMN], spec, PREDICT_CHUNK,
                                                       deadline=deadline)) as chunks:
                    for start, chunk in chunks:
                        # predict_on_batch: Keras' compiled (tf.function) predict step, without
                        # model.predict's progress bar and per-call tf.data pipeline; about twice as fast
                        # as an eager self.keras_model(chunk) call, which dispatches every layer's ops one by one.
                        probabilities[start : start + len(chunk)] = np.asarray(
                            self.keras_model.predict_on_batch(chunk), dtype=np.float64
                        ).reshape(-1)
        except RequestRejected as exc:  # the scoring server answers HTTP 400 with this message
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        bad = np.flatnonzero(~np.isfinite(probabilities))
        if bad.size:
            raise MlflowException(
                f"the model produced non-finite probabilities for rows {bad.tolist()[:MAX_LISTED_ERRORS]}; "
                "its weights are probably broken (retrain or roll back the model)",
                error_code=INTERNAL_ERROR,
            )
        return label_probabilities(probabilities, spec, lung_crop)


# ---------------------------------------------------------------------------------------------
# Logging and loading
# ---------------------------------------------------------------------------------------------


def request_schema() -> Schema:
    """``image``: any type, optional. The model checks every row itself (bytes or base64 text, with
    the row's number and reason); MLflow's own enforcement would refuse a bad request first with
    ``Failed to enforce schema of data '<the request>'``, echoing it back in the error body."""
    return Schema([ColSpec(AnyType(), INPUT_COLUMN, required=False)])


def serving_signature() -> ModelSignature:
    """``image`` (PNG/JPEG bytes or base64 text, checked by the model) -> ``probability`` double,
    ``label`` string, ``lung_crop`` boolean."""
    return ModelSignature(
        inputs=request_schema(),
        outputs=Schema([ColSpec("double", "probability"), ColSpec("string", "label"), ColSpec("boolean", "lung_crop")]),
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
    max_rows: int = DEFAULT_MAX_ROWS,
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS,
    keras_flavour_name: str | None = KERAS_FLAVOUR_NAME,
    segmenter=None,
) -> ModelInfo:
    """Log ``keras_model`` as the raw-image pyfunc model in the active run; returns MLflow's ``ModelInfo``.

    ``keras_model``: input float32 (S, S, 1) in [0, 1] with S == ``spec.image_size``, output (1,)
    sigmoid. ``threshold`` in [0, 1] cuts the probability into labels. ``segmenter`` (a Keras U-Net,
    ``lungs.segmenter``) is required when ``spec.lungs`` is not ``none``: the served model runs it on
    every row, as preprocess did, and must be the very model named by ``spec.lung_model``. ``extra_metadata`` (JSON
    values) goes into the MLmodel metadata and the serving spec beside the spec and threshold.

    Unless ``keras_flavour_name`` is None, the bare Keras model is also logged (``mlflow.keras``, about
    0.2 s, one more copy of the weights) as a second model of the run, *before* the pyfunc model so
    that ``mlflow.last_logged_model()`` is the served one. Only the pyfunc model is registered.

    Long mostly in its checks and this docstring: the spec, the example and the two log calls.
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
        max_rows=max_rows,
        max_request_pixels=max_request_pixels,
        extra=dict(extra_metadata or {}),
    )
    if (spec.lungs != "none") != (segmenter is not None):
        raise ValueError(f"lungs={spec.lungs}: a segmenter is needed exactly when the model was trained on lung "
                         "views (pass the one named by spec.lung_model)")
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
            metadata={SERVING_METADATA_KEY: serving_spec.to_json_dict()},
        )
    with tempfile.TemporaryDirectory(prefix="cxrexp-serving-") as tmp:
        keras_path = Path(tmp) / KERAS_FILE_NAME
        spec_path = Path(tmp) / SPEC_FILE_NAME
        keras_model.save(keras_path)
        spec_path.write_text(json.dumps(serving_spec.to_json_dict(), indent=2), encoding="utf-8")
        artifacts = {KERAS_ARTIFACT: str(keras_path), SPEC_ARTIFACT: str(spec_path)}
        if segmenter is not None:
            segmenter_path = Path(tmp) / SEGMENTER_FILE_NAME
            segmenter.save(segmenter_path)
            artifacts[SEGMENTER_ARTIFACT] = str(segmenter_path)
        # Models from code, not a cloudpickled instance: nothing is unpickled at load time and the
        # class is whatever cxrexp/serving.py says in the model's own code/ copy.
        model_script = Path(tmp) / MODEL_SCRIPT_NAME
        model_script.write_text(_MODEL_SCRIPT, encoding="utf-8")
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(model_script),
            artifacts=artifacts,
            code_paths=[str(_PACKAGE_DIR)],
            signature=serving_signature(),
            input_example=input_example,
            pip_requirements=requirements,
            registered_model_name=registered_model_name,
            metadata={SERVING_METADATA_KEY: serving_spec.to_json_dict()},
        )


def load_pyfunc(model_uri: str) -> mlflow.pyfunc.PyFuncModel:
    """``mlflow.pyfunc.load_model``; ``ModelNotFound`` (naming the URI and what exists) when it fails."""
    # Loading prepends the model's code/ copy to sys.path. This process already runs its own cxrexp, so
    # the copy is never imported here, but worker processes started later (spawn) would import the
    # copy instead: a model logged by an older release would break them. Keep sys.path as it was.
    saved_path = list(sys.path)
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError) as exc:
        first_line = (str(exc).splitlines() or [""])[0][:300]
        raise ModelNotFound(
            f"no model at {model_uri!r} ({type(exc).__name__}: {first_line}); {describe_what_exists(model_uri)}"
        ) from exc
    finally:
        sys.path[:] = saved_path


@dataclass(frozen=True)
class LoadedClassifier:
    """A raw-image model's parts for evaluation and Grad-CAM, as ``RawImageClassifier`` loaded them."""

    keras_model: Any  # float32 (N, S, S, 1) in [0, 1] -> (N, 1); layers block{i}_conv, logit reachable
    image_spec: ImageSpec
    threshold: float
    # The carried segmenter's forward pass, the very one serving runs (None for a whole-image model):
    # images prepared outside serving (external sets) get the masks a served request would.
    lung_masks: Callable[[list[np.ndarray]], list[np.ndarray]] | None = None


def load_classifier(model_uri: str) -> LoadedClassifier:
    """A raw-image model URI -> its ``LoadedClassifier``.

    Raises ``ModelNotFound`` when the URI resolves to no model, or to one that is not a
    ``RawImageClassifier``.
    """
    pyfunc_model = load_pyfunc(model_uri)
    try:
        python_model = pyfunc_model.unwrap_python_model()
    except MlflowException as exc:
        raise ModelNotFound(
            f"{model_uri!r} is a {pyfunc_model.loader_module} model, not a cxrexp raw-image model "
            "(log one with cxrexp.mlflow_edge.serving.log_raw_image_model)"
        ) from exc
    # Duck-typed: the class may come from the model's own code copy rather than this module.
    if not (hasattr(python_model, "keras_model") and hasattr(python_model, "serving_spec")):
        raise ModelNotFound(
            f"{model_uri!r} wraps {type(python_model).__name__}, not RawImageClassifier "
            "(log one with cxrexp.mlflow_edge.serving.log_raw_image_model)"
        )
    spec = python_model.serving_spec
    lung_masks = python_model.lung_masks if spec.image_spec.lungs != "none" else None
    return LoadedClassifier(python_model.keras_model, spec.image_spec, float(spec.threshold), lung_masks)


def load_keras_model(model_uri: str):
    """A raw-image model URI -> ``(keras.Model, ImageSpec, threshold)`` (``load_classifier``'s first three)."""
    loaded = load_classifier(model_uri)
    return loaded.keras_model, loaded.image_spec, loaded.threshold


__all__ = [
    "KERAS_FLAVOUR_NAME",
    "LoadedClassifier",
    "ModelNotFound",
    "RawImageClassifier",
    "keras_signature",
    "load_classifier",
    "load_keras_model",
    "load_pyfunc",
    "log_raw_image_model",
    "pinned_requirements",
    "serving_signature",
]
