"""The served lung segmenter: raw PNG/JPEG in, a lung mask at the image's own size out (MLflow edge).

Request (``pandas.DataFrame``, one row per image): ``image``, PNG/JPEG bytes or base64 text, as for
the classifier (``cxrexp.images.request_images``). Response, same row order:
    ``mask``       base64 text of a PNG, uint8 {0, 255}, the input image's own height x width
    ``lung_area``  float64 in [0, 1], the mask's share of the image

The Keras U-Net and a small spec (``image_size``, limits) travel as artifacts; the model is logged
from code, like the classifier, with the cxrexp package as its code.
"""

from __future__ import annotations

import base64
import json
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import cv2
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
from mlflow.types.schema import ColSpec, Schema

import cxrexp
from cxrexp.config import MAX_PIXELS
from cxrexp.errors import ModelNotFound
from cxrexp.images.decode import decode_grey
from cxrexp.images.request_images import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_REQUEST_PIXELS,
    DEFAULT_MAX_ROWS,
    INPUT_COLUMN,
    Deadline,
    RequestLimits,
    RequestRejected,
    RowRejected,
    check_deadline,
    check_request,
    decode_row,
    example_png,
    reject,
    with_served_limits,
)
from cxrexp.mlflow_edge.served_errors import guarded_predict
from cxrexp.mlflow_edge.serving import (
    load_pyfunc,
    pinned_requirements,
    request_schema,
    served_deadline,
)

KERAS_ARTIFACT = "segmenter"
SPEC_ARTIFACT = "segmenter_spec"
MODEL_SCRIPT = (
    '"""MLflow models-from-code entry: the cxrexp lung segmenter."""\n'
    "import mlflow\n"
    "from cxrexp.mlflow_edge.segmenter_serving import LungSegmenterModel\n"
    "mlflow.models.set_model(LungSegmenterModel())\n"
)
PREDICT_CHUNK = 16


def encode_mask(mask: np.ndarray) -> str:
    """bool HxW -> base64 text of a PNG, uint8 {0, 255}."""
    ok, png = cv2.imencode(".png", mask.astype(np.uint8) * 255)
    if not ok:
        raise RuntimeError("OpenCV could not encode a mask as PNG")
    return base64.b64encode(png.tobytes()).decode("ascii")


def decode_mask(text: str) -> np.ndarray:
    """The inverse of ``encode_mask``: bool HxW."""
    return decode_grey(base64.b64decode(text), min_side=1) > 127


def decode_rows(cells: pd.Series, limits: RequestLimits, deadline: Deadline | None = None) -> list[np.ndarray]:
    """uint8 grey images, one per row, each at its own size.

    First the request-level limits (``check_request``: rows and total pixels from the file headers,
    before anything is decoded), then per row; either raises one MlflowException (HTTP 400) worded as
    the classifier words it (``request_images.reject``), listing every bad row. Past ``deadline``
    (checked before each row) ``RequestTimedOut``: the rest are not decoded."""
    try:
        values = check_request(list(cells), limits)
    except RequestRejected as exc:
        raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
    greys: list[np.ndarray] = []
    errors: list[str] = []
    for i, value in enumerate(values):
        check_deadline(deadline)
        try:
            greys.append(decode_row(value, limits.max_bytes, limits.max_pixels))
        except RowRejected as exc:
            errors.append(f"row {i}: {exc.reason}")
    if errors:
        raise MlflowException(str(reject(errors, len(values))), error_code=INVALID_PARAMETER_VALUE)
    return greys


class LungSegmenterModel(mlflow.pyfunc.PythonModel):
    """Raw X-ray files -> lung masks at each image's own size (``keras_model``, ``spec``, ``limits`` after load).

    ``limits``: as logged (a model logged before the request-level limits existed gets their
    defaults), with ``CXREXP_MAX_ROWS`` / ``CXREXP_MAX_REQUEST_PIXELS`` where it is served.
    """

    def __init__(self) -> None:
        self.keras_model = None
        self.spec: dict[str, Any] = {}
        self.limits = RequestLimits()

    def load_context(self, context) -> None:
        import keras

        self.spec = json.loads(Path(context.artifacts[SPEC_ARTIFACT]).read_text(encoding="utf-8"))
        self.limits = with_served_limits(RequestLimits.from_json_dict(self.spec))
        self.keras_model = keras.saving.load_model(context.artifacts[KERAS_ARTIFACT], compile=False)

    @guarded_predict
    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from cxrexp.lungs.segmenter import predict_masks

        if self.keras_model is None:
            raise MlflowException("predict called before load_context", error_code=INTERNAL_ERROR)
        if not isinstance(model_input, pd.DataFrame) or INPUT_COLUMN not in model_input.columns:
            raise MlflowException(f"send a DataFrame with an {INPUT_COLUMN!r} column of PNG/JPEG bytes or base64",
                                  error_code=INVALID_PARAMETER_VALUE)
        greys = decode_rows(model_input[INPUT_COLUMN], self.limits, served_deadline())
        masks = predict_masks(self.keras_model, greys, PREDICT_CHUNK)
        return pd.DataFrame({"mask": [encode_mask(m) for m in masks],
                             "lung_area": [float(m.mean()) for m in masks]})


def segmenter_signature() -> ModelSignature:
    return ModelSignature(inputs=request_schema(),
                          outputs=Schema([ColSpec("string", "mask"), ColSpec("double", "lung_area")]))


def log_segmenter_model(keras_model, *, name: str = "model", extra_metadata: dict | None = None,
                        max_pixels: int = MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES,
                        max_rows: int = DEFAULT_MAX_ROWS,
                        max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS) -> ModelInfo:
    """Log the U-Net as the raw-image segmenter pyfunc model in the active run, with its request limits
    (``RequestLimits``; the request-level two can be changed where it is served)."""
    if mlflow.active_run() is None:
        raise RuntimeError("log_segmenter_model needs an active run")
    limits = RequestLimits(max_pixels, max_bytes, max_rows, max_request_pixels)
    spec = {"image_size": int(keras_model.inputs[0].shape[1]), **asdict(limits), **(extra_metadata or {})}
    example = pd.DataFrame({INPUT_COLUMN: [base64.b64encode(example_png()).decode("ascii")]})
    with tempfile.TemporaryDirectory(prefix="cxrexp-segmenter-") as tmp:
        keras_path = Path(tmp) / "segmenter.keras"
        spec_path = Path(tmp) / "segmenter_spec.json"
        script = Path(tmp) / "lung_segmenter_model.py"
        keras_model.save(keras_path)
        spec_path.write_text(json.dumps(spec, indent=2), encoding="utf-8")
        script.write_text(MODEL_SCRIPT, encoding="utf-8")
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(script),
            artifacts={KERAS_ARTIFACT: str(keras_path), SPEC_ARTIFACT: str(spec_path)},
            code_paths=[str(Path(cxrexp.__file__).resolve().parent)],
            signature=segmenter_signature(),
            input_example=example,
            pip_requirements=pinned_requirements(),
            metadata={"cxrexp_segmenter": spec},
        )


def load_segmenter(model_uri: str):
    """A segmenter model URI -> (keras.Model, spec dict); ``ModelNotFound`` when it is not one."""
    pyfunc_model = load_pyfunc(model_uri)
    try:
        python_model = pyfunc_model.unwrap_python_model()
    except MlflowException as exc:
        raise ModelNotFound(f"{model_uri!r} is not a cxrexp lung segmenter ({exc})") from exc
    if not (hasattr(python_model, "keras_model") and hasattr(python_model, "spec") and "image_size" in python_model.spec):
        raise ModelNotFound(f"{model_uri!r} wraps {type(python_model).__name__}, not LungSegmenterModel: "
                            "train one with `mlflow run . -e segment`")
    return python_model.keras_model, python_model.spec


__all__ = ["LungSegmenterModel", "decode_mask", "encode_mask", "load_segmenter", "log_segmenter_model",
           "segmenter_signature"]
