"""The raw-image pyfunc model: log, reload, predict on raw files, reject bad rows, serve over HTTP."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import cv2
import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, ErrorCode
from mlflow.pyfunc import scoring_server

from cxrexp.config import ImageSpec
from cxrexp.images.decode import decode_grey
from cxrexp.images.request_images import MIN_SIDE
from cxrexp.images.transforms import prepare
from cxrexp.mlflow_edge.serving import (
    ModelNotFound,
    load_keras_model,
    log_raw_image_model,
)

SIZE = 32
SPEC = ImageSpec(image_size=SIZE, enhance="clahe", clip_limit=2.0, tile_grid=4, lungs="none")
MAX_PIXELS = 1_000_000
MAX_BYTES = 300_000  # above every test image, so "oversized" can be tested cheaply
REGISTERED_NAME = "cxr-serving-test"
INVALID = ErrorCode.Name(INVALID_PARAMETER_VALUE)


# ------------------------------------------------------------------------------------------------
# Test images: different sizes, bit depths, channel counts and formats
# ------------------------------------------------------------------------------------------------


def _scene(height: int, width: int, seed: int) -> np.ndarray:
    """float in [0, 1] HxW: a gradient, a disc and noise, different per seed so predictions differ."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    base = (xx / width) * (0.3 + 0.1 * seed) + (yy / height) * 0.3
    disc = ((yy - height * rng.uniform(0.3, 0.7)) ** 2 + (xx - width * rng.uniform(0.3, 0.7)) ** 2) < (
        min(height, width) / 4
    ) ** 2
    return np.clip(base + 0.4 * disc + rng.normal(0, 0.05, (height, width)), 0, 1)


def _encode(ext: str, image: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(ext, image)
    assert ok, ext
    return encoded.tobytes()


def _make_images() -> dict[str, bytes]:
    grey8 = (_scene(40, 50, 0) * 255).astype(np.uint8)
    grey16 = (_scene(64, 48, 1) * 65535).astype(np.uint16)
    bgra = np.dstack([(_scene(72, 72, 2) * 255).astype(np.uint8)] * 3 + [np.full((72, 72), 200, np.uint8)])
    bgr = np.dstack([(_scene(80, 100, 3) * 255).astype(np.uint8)] * 3)
    return {
        "png8_grey_40x50": _encode(".png", grey8),
        "png16_grey_64x48": _encode(".png", grey16),
        "png8_rgba_72x72": _encode(".png", bgra),
        "jpeg_rgb_80x100": _encode(".jpg", bgr),
    }


IMAGES = _make_images()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _manual_probability(keras_model, data: bytes) -> float:
    """The training path by hand: decode -> prepare -> /255 -> Keras."""
    prepared = prepare(decode_grey(data, max_pixels=MAX_PIXELS, min_side=MIN_SIDE), SPEC)
    batch = prepared.astype(np.float32)[None, :, :, None] / 255.0
    return float(keras_model.predict(batch, verbose=0)[0, 0])


def _tiny_model() -> keras.Model:
    """The layer names of cxrexp.model.build_cnn, 32 px, untrained (fixed seeds)."""
    init = keras.initializers.GlorotUniform(seed=7)
    inputs = keras.Input(shape=(SIZE, SIZE, 1), dtype="float32", name="image")
    x = keras.layers.Conv2D(
        4, 3, padding="same", activation="relu", kernel_initializer=init, name="block1_conv"
    )(inputs)
    x = keras.layers.MaxPooling2D(4, name="block1_pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    logit = keras.layers.Dense(1, kernel_initializer=keras.initializers.GlorotUniform(seed=8), name="logit")(x)
    probability = keras.layers.Activation("sigmoid", name="probability")(logit)
    return keras.Model(inputs, probability)


# ------------------------------------------------------------------------------------------------
# One logged model for the whole module (logging costs a few seconds)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serving")
    tracking_uri = f"sqlite:///{tmp}/mlflow.db"
    previous_uri = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        mlflow.set_tracking_uri(tracking_uri)
        keras_model = _tiny_model()
        expected = {name: _manual_probability(keras_model, data) for name, data in IMAGES.items()}
        # A threshold between the probabilities, so both labels occur and a wrong cut would show.
        ordered = sorted(expected.values())
        threshold = (ordered[1] + ordered[2]) / 2
        mlflow.set_experiment("serving-test")
        with mlflow.start_run() as run:
            info = log_raw_image_model(
                keras_model,
                SPEC,
                threshold,
                registered_model_name=REGISTERED_NAME,
                input_example_png=IMAGES["png8_grey_40x50"],
                extra_metadata={"source_run": "unit-test"},
                max_pixels=MAX_PIXELS,
                max_bytes=MAX_BYTES,
            )
        pyfunc_model = mlflow.pyfunc.load_model(info.model_uri)
        yield {
            "info": info,
            "run_id": run.info.run_id,
            "pyfunc": pyfunc_model,
            "expected": expected,
            "threshold": threshold,
            "keras_model": keras_model,
            "tracking_uri": tracking_uri,
            "tmp": tmp,
        }
    mlflow.set_tracking_uri(previous_uri)


def test_log_refuses_spec_that_does_not_match_model_input(logged):
    with mlflow.start_run(), pytest.raises(ValueError, match="image_size=64"):
        log_raw_image_model(logged["keras_model"], ImageSpec(image_size=64, lungs="none"), 0.5)


# ------------------------------------------------------------------------------------------------
# The logged model
# ------------------------------------------------------------------------------------------------


def _as_data_url(data: bytes) -> str:
    return "data:image/png;base64," + _b64(data)


@pytest.mark.parametrize("image_name", sorted(IMAGES))
@pytest.mark.parametrize("encoding", [bytes, _b64, _as_data_url], ids=["bytes", "base64", "data_url"])
def test_prediction_equals_manual_training_path(logged, image_name, encoding):
    result = logged["pyfunc"].predict(pd.DataFrame({"image": [encoding(IMAGES[image_name])]}))
    assert list(result.columns) == ["probability", "label", "lung_crop"]
    np.testing.assert_allclose(result["probability"].iloc[0], logged["expected"][image_name], atol=1e-5)


def test_batch_of_mixed_rows_keeps_order_and_labels_at_threshold(logged):
    names = sorted(IMAGES)
    cells = [IMAGES[n] if i % 2 else _b64(IMAGES[n]) for i, n in enumerate(names)]
    result = logged["pyfunc"].predict(pd.DataFrame({"image": cells}))
    expected = np.array([logged["expected"][n] for n in names])
    np.testing.assert_allclose(result["probability"].to_numpy(), expected, atol=1e-5)
    expected_labels = np.where(expected >= logged["threshold"], "COVID", "Normal").tolist()
    assert result["label"].tolist() == expected_labels
    assert set(expected_labels) == {"COVID", "Normal"}  # the threshold really splits this batch


GOOD = IMAGES["png8_grey_40x50"]
PNG_HEAD = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "bad_cell, reason",
    [
        (b"this is not an image at all", "not an image"),
        (b"", "empty file"),
        ("%%% definitely not base64 %%%", "not base64"),
        (PNG_HEAD + b"\0" * MAX_BYTES, f"too large: {MAX_BYTES + 8} bytes (maximum {MAX_BYTES})"),
        (_b64(PNG_HEAD + b"\0" * MAX_BYTES), "too large"),
        (GOOD[: len(GOOD) // 2], "truncated or corrupt"),
        (_encode(".png", np.zeros((8, 8), np.uint8)), "too small"),
    ],
)
def test_bad_row_fails_request_naming_row(logged, bad_cell, reason):
    with pytest.raises(MlflowException) as err:
        logged["pyfunc"].predict(pd.DataFrame({"image": [GOOD, GOOD, bad_cell]}))
    assert err.value.error_code == INVALID
    assert err.value.get_http_status_code() == 400
    assert f"row 2: {reason}" in err.value.message
    assert "row 0" not in err.value.message and "Traceback" not in err.value.message


@pytest.mark.parametrize(
    "environ, n_rows, words",
    [
        ({"CXREXP_MAX_ROWS": "2"}, 3, "more than the limit of 2 rows per request (max_rows)"),
        ({"CXREXP_MAX_REQUEST_PIXELS": "1999"}, 1, "2000 pixels in all, more than the limit of 1999 per request"),
    ],
)
def test_request_limits_set_where_the_model_is_served_refuse_with_a_400(logged, monkeypatch, environ, n_rows, words):
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    served = mlflow.pyfunc.load_model(logged["info"].model_uri)  # the limits are read when it loads
    with pytest.raises(MlflowException) as err:
        served.predict(pd.DataFrame({"image": [GOOD] * n_rows}))
    assert err.value.error_code == INVALID and err.value.get_http_status_code() == 400
    assert words in err.value.message
    assert len(logged["pyfunc"].predict(pd.DataFrame({"image": [GOOD] * 3}))) == 3  # logged defaults: fine


def test_a_model_with_nan_weights_is_a_server_fault_not_nan_answers():
    from cxrexp.images.request_images import ServingSpec
    from cxrexp.mlflow_edge.serving import RawImageClassifier

    broken = _tiny_model()
    weights = broken.get_layer("logit").get_weights()
    weights[0][...] = np.nan
    broken.get_layer("logit").set_weights(weights)
    model = RawImageClassifier()
    model.keras_model, model.serving_spec = broken, ServingSpec(SPEC, 0.5)
    with pytest.raises(MlflowException) as err:
        model.predict(None, pd.DataFrame({"image": [GOOD, GOOD]}))
    assert err.value.get_http_status_code() == 500 and "non-finite probabilities for rows [0, 1]" in err.value.message


@pytest.mark.parametrize("fault", [MemoryError(), ZeroDivisionError("a bug in the model code")])
def test_a_fault_inside_the_server_is_a_500_with_a_reference_and_no_stack_trace(logged, monkeypatch, fault, caplog):
    """MLflow's scoring server answered any unexpected exception with 400 ("check your input") and the
    stack trace in the body; served_errors.guarded_predict makes it a 500 whose body is a reference."""
    model = logged["pyfunc"]

    def broken(batch):
        raise fault

    monkeypatch.setattr(model.unwrap_python_model().keras_model, "predict_on_batch", broken)
    with pytest.raises(MlflowException) as err:
        _invoke(model, {"dataframe_records": [{"image": _b64(GOOD)}]})
    body = err.value.serialize_as_json()
    assert err.value.get_http_status_code() == 500
    assert "internal error in the model server (reference " in body
    for internals in ("Traceback", "stack_trace", type(fault).__name__, "a bug in the model code"):
        assert internals not in body
    reference = re.search(r"reference ([0-9a-f]{12})", body).group(1)
    assert any(reference in r.getMessage() and r.exc_info for r in caplog.records)  # the details are in the log


@pytest.mark.parametrize("environ, seconds", [
    ({}, None),  # in-process (cxrexp predict, evaluate): no deadline
    ({"_MLFLOW_IS_IN_SERVING_ENVIRONMENT": "true"}, 60.0),  # MLflow's default request timeout
    ({"_MLFLOW_IS_IN_SERVING_ENVIRONMENT": "true", "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": "7"}, 7.0),
])
def test_the_served_deadline_is_the_servers_own_request_timeout(environ, seconds):
    from cxrexp.mlflow_edge.serving import served_deadline

    deadline = served_deadline(environ)
    assert (deadline.seconds if deadline else None) == seconds


def test_a_request_past_the_servers_timeout_stops_and_is_a_504(logged, monkeypatch):
    monkeypatch.setenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "true")
    monkeypatch.setenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "-1")  # already past when predict starts
    with pytest.raises(MlflowException) as err:
        logged["pyfunc"].predict(pd.DataFrame({"image": [GOOD] * 3}))
    assert err.value.get_http_status_code() == 504 and "longer than its timeout" in err.value.message


def test_every_bad_row_is_listed(logged):
    cells = [GOOD, b"junk", GOOD, b"", "@@@"]
    with pytest.raises(MlflowException) as err:
        logged["pyfunc"].predict(pd.DataFrame({"image": cells}))
    message = err.value.message
    assert "3 of 5 rows rejected" in message
    assert "row 1: not an image" in message and "row 3: empty file" in message and "row 4: not base64" in message


def test_missing_image_column_is_a_400(logged):
    with pytest.raises(MlflowException) as err:
        logged["pyfunc"].predict(pd.DataFrame({"picture": [GOOD]}))
    assert err.value.get_http_status_code() == 400
    assert "image" in err.value.message


def test_python_model_missing_column_message(logged):
    """Called without schema enforcement (unwrapped), the model names the column itself."""
    python_model = logged["pyfunc"].unwrap_python_model()
    with pytest.raises(MlflowException, match="missing column 'image'") as err:
        python_model.predict(None, pd.DataFrame({"picture": [GOOD]}))
    assert err.value.error_code == INVALID


def test_signature_metadata_and_requirements(logged):
    meta = logged["pyfunc"].metadata
    # any type, optional: the model checks each row itself, so MLflow's schema check never echoes a request
    assert meta.get_input_schema().to_dict() == [{"type": "any", "name": "image", "required": False}]
    assert [c["name"] for c in meta.get_output_schema().to_dict()] == ["probability", "label", "lung_crop"]
    assert meta.metadata["cxrexp_serving"]["threshold"] == pytest.approx(logged["threshold"])
    assert meta.metadata["cxrexp_serving"]["source_run"] == "unit-test"
    local = Path(mlflow.artifacts.download_artifacts(logged["info"].model_uri))
    requirements = (local / "requirements.txt").read_text()
    assert f"mlflow=={mlflow.__version__}" in requirements and f"keras=={keras.__version__}" in requirements
    assert (local / "code" / "cxrexp" / "images" / "decode.py").exists()
    assert not (local / "code" / "cxrexp" / "__pycache__").exists()


def test_input_example_validates_against_serving(logged, tmp_path):
    """The stored serving example is the base64 PNG and predicts through MLflow's own predict path."""
    local = Path(mlflow.artifacts.download_artifacts(logged["info"].model_uri))
    serving_input = json.loads((local / "serving_input_example.json").read_text())
    assert serving_input["dataframe_split"]["columns"] == ["image"]
    assert serving_input["dataframe_split"]["data"][0][0] == _b64(GOOD)
    example = mlflow.models.Model.load(local).load_input_example(local)
    assert json.loads(mlflow.models.convert_input_example_to_serving_input(example)) == serving_input
    output_path = tmp_path / "predictions.json"
    # env_manager="local" runs scoring_server._predict in this process, as `mlflow models predict` would.
    mlflow.models.predict(
        logged["info"].model_uri,
        input_path=str(local / "serving_input_example.json"),
        content_type="json",
        env_manager="local",
        output_path=str(output_path),
    )
    predictions = json.loads(output_path.read_text())["predictions"]
    assert predictions[0]["probability"] == pytest.approx(logged["expected"]["png8_grey_40x50"], abs=1e-5)


def _invoke(model, payload: dict):
    """What the scoring server does with a JSON body (scoring_server.invocations), minus HTTP."""
    return scoring_server.invocations(
        json.dumps(payload), "application/json", model, model.metadata.get_input_schema()
    )


def test_scoring_server_parses_base64_strings_and_rejects_bad_rows_with_400(logged):
    model = logged["pyfunc"]
    records = [{"image": _as_data_url(IMAGES["png16_grey_64x48"])}, {"image": _b64(IMAGES["jpeg_rgb_80x100"])}]
    response = _invoke(model, {"dataframe_records": records})
    assert response.status == 200
    predictions = json.loads(response.response)["predictions"]
    np.testing.assert_allclose(
        [p["probability"] for p in predictions],
        [logged["expected"]["png16_grey_64x48"], logged["expected"]["jpeg_rgb_80x100"]],
        atol=1e-5,
    )
    with pytest.raises(MlflowException) as err:
        _invoke(model, {"dataframe_records": records + [{"image": "not*base64"}]})
    assert err.value.get_http_status_code() == 400
    assert "row 2: not base64" in json.loads(err.value.serialize_as_json())["message"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_http_scoring_server_returns_400_for_bad_rows(logged):
    """The real FastAPI app on loopback: 200 for good rows, 400 with the row list for bad ones."""
    requests = pytest.importorskip("requests")
    uvicorn = pytest.importorskip("uvicorn")
    app = scoring_server.init(logged["pyfunc"])
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started, "uvicorn did not start within 20 s"
        url = f"http://127.0.0.1:{port}/invocations"
        good = requests.post(url, json={"dataframe_records": [{"image": _b64(GOOD)}]}, timeout=30)
        assert good.status_code == 200, good.text
        assert good.json()["predictions"][0]["probability"] == pytest.approx(
            logged["expected"]["png8_grey_40x50"], abs=1e-5
        )
        bad = requests.post(
            url, json={"dataframe_records": [{"image": _b64(GOOD)}, {"image": _b64(b"junk")}]}, timeout=30
        )
        assert bad.status_code == 400, bad.text
        assert bad.json()["error_code"] == INVALID
        assert "row 1: not an image" in bad.json()["message"]
    finally:
        server.should_exit = True
        thread.join(timeout=10)


# ------------------------------------------------------------------------------------------------
# Loading back the Keras model
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("uri_kind", ["model_uri", "runs", "registered"])
def test_load_keras_model_gives_same_predictions(logged, uri_kind):
    uri = {
        "model_uri": logged["info"].model_uri,
        "runs": f"runs:/{logged['run_id']}/model",
        "registered": f"models:/{REGISTERED_NAME}/1",
    }[uri_kind]
    keras_model, spec, threshold = load_keras_model(uri)
    assert spec == SPEC
    assert threshold == pytest.approx(logged["threshold"])
    assert {"block1_conv", "logit", "probability"} <= {layer.name for layer in keras_model.layers}
    names = sorted(IMAGES)
    batch = np.stack(
        [prepare(decode_grey(IMAGES[n], max_pixels=MAX_PIXELS), spec) for n in names]
    ).astype(np.float32)[..., None] / 255.0
    probabilities = keras_model.predict(batch, verbose=0)[:, 0]
    np.testing.assert_allclose(probabilities, [logged["expected"][n] for n in names], atol=1e-5)


@pytest.mark.parametrize(
    "uri, hint",
    [
        (f"models:/{REGISTERED_NAME}/99", "versions of 'cxr-serving-test': [1]"),
        (f"models:/{REGISTERED_NAME}@champion", "aliases: none"),
        ("models:/m-0123456789abcdef", "no logged model with that id"),
        ("models:/no-such-model/1", f"registered models: ['{REGISTERED_NAME}']"),
        ("runs:/0123456789abcdef0123456789abcdef/model", "no run"),
        ("RUN/wrong-name", "models logged by run"),
        ("/nonexistent/cxrexp/model", "does not exist"),
    ],
)
def test_load_keras_model_wrong_uri(logged, uri, hint):
    uri = uri.replace("RUN", f"runs:/{logged['run_id']}")
    with pytest.raises(ModelNotFound) as err:
        load_keras_model(uri)
    assert uri in str(err.value)
    assert hint in str(err.value)


def test_keras_flavour_is_logged_beside_the_pyfunc_model(logged):
    keras_copy = mlflow.keras.load_model(f"runs:/{logged['run_id']}/keras_model")
    batch = np.stack(
        [prepare(decode_grey(IMAGES[n], max_pixels=MAX_PIXELS), SPEC) for n in sorted(IMAGES)]
    ).astype(np.float32)[..., None] / 255.0
    np.testing.assert_allclose(
        keras_copy.predict(batch, verbose=0)[:, 0], [logged["expected"][n] for n in sorted(IMAGES)], atol=1e-5
    )
    models = mlflow.search_logged_models(
        filter_string=f"source_run_id = '{logged['run_id']}'", output_format="list"
    )
    assert sorted(m.name for m in models) == ["keras_model", "model"]
    # Only the served (pyfunc) model is registered.
    version = mlflow.MlflowClient().get_model_version(REGISTERED_NAME, "1")
    assert logged["info"].model_id in version.source


def test_fresh_process_loads_and_predicts_identically(logged, tmp_path):
    """A new interpreter that cannot see the work tree: cxrexp comes from the model's code/ copy."""
    for name, data in IMAGES.items():
        (tmp_path / f"{name}.img").write_bytes(data)
    script = textwrap.dedent(
        f"""
        import json, sys
        from pathlib import Path
        import mlflow, pandas as pd
        model = mlflow.pyfunc.load_model({logged["info"].model_uri!r})
        import cxrexp
        names = {sorted(IMAGES)!r}
        frame = pd.DataFrame({{"image": [Path(n + ".img").read_bytes() for n in names]}})
        out = model.predict(frame)
        print(json.dumps({{"cxrexp": cxrexp.__file__, "probability": out["probability"].tolist(),
                           "label": out["label"].tolist()}}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MLFLOW_TRACKING_URI"] = logged["tracking_uri"]
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "/code/cxrexp/" in result["cxrexp"]  # not the work tree: code_paths is complete
    in_process = logged["pyfunc"].predict(pd.DataFrame({"image": [IMAGES[n] for n in sorted(IMAGES)]}))
    np.testing.assert_allclose(result["probability"], in_process["probability"].to_numpy(), rtol=0, atol=1e-7)
    assert result["label"] == in_process["label"].tolist()
    assert not any(math.isnan(p) for p in result["probability"])


def test_the_served_segmenter_stops_decoding_past_the_deadline_too(monkeypatch):
    from cxrexp.mlflow_edge.segmenter_serving import LungSegmenterModel

    monkeypatch.setenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "true")
    monkeypatch.setenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "-1")  # already past
    model = LungSegmenterModel()
    model.keras_model = object()  # never reached
    with pytest.raises(MlflowException) as err:
        model.predict(None, pd.DataFrame({"image": [GOOD] * 3}))
    assert err.value.get_http_status_code() == 504 and "longer than its timeout" in err.value.message


@pytest.mark.parametrize(
    "logged_limits, environ, n_rows, words",
    [
        ({"max_rows": 2}, {}, 3, "3 rows, more than the limit of 2 rows per request (max_rows)"),
        ({}, {"CXREXP_MAX_ROWS": "2"}, 3, "3 rows, more than the limit of 2 rows per request (max_rows)"),
        ({}, {"CXREXP_MAX_REQUEST_PIXELS": "3999"}, 2, "4000 pixels in all, more than the limit of 3999 per request"),
        ({"max_request_pixels": 4000}, {"CXREXP_MAX_REQUEST_PIXELS": "1999"}, 1, "more than the limit of 1999"),
    ],
)
def test_the_served_segmenter_enforces_the_request_limits_before_decoding(tmp_path, monkeypatch, logged_limits,
                                                                          environ, n_rows, words):
    """The segmenter's pyfunc used to check only per-row limits: a request of any number of rows was decoded."""
    from types import SimpleNamespace

    from cxrexp.lungs.segmenter import build_unet
    from cxrexp.mlflow_edge import segmenter_serving

    build_unet(32, base_filters=4, depth=2, seed=1).save(tmp_path / "unet.keras")
    spec = {"image_size": 32, "max_pixels": MAX_PIXELS, "max_bytes": MAX_BYTES, **logged_limits}
    (tmp_path / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    model = segmenter_serving.LungSegmenterModel()
    model.load_context(SimpleNamespace(artifacts={segmenter_serving.KERAS_ARTIFACT: str(tmp_path / "unet.keras"),
                                                  segmenter_serving.SPEC_ARTIFACT: str(tmp_path / "spec.json")}))

    def never(*args):
        raise AssertionError("a row was decoded before the request-level limits were checked")

    monkeypatch.setattr(segmenter_serving, "decode_row", never)
    with pytest.raises(MlflowException) as err:
        model.predict(None, pd.DataFrame({"image": [GOOD] * n_rows}))
    assert err.value.error_code == INVALID and err.value.get_http_status_code() == 400
    assert words in err.value.message


def test_a_segmenter_logged_before_the_request_limits_gets_their_defaults():
    from cxrexp.images.request_images import (
        DEFAULT_MAX_REQUEST_PIXELS,
        DEFAULT_MAX_ROWS,
        RequestLimits,
    )

    limits = RequestLimits.from_json_dict({"image_size": 64, "max_pixels": MAX_PIXELS, "max_bytes": MAX_BYTES})
    assert (limits.max_rows, limits.max_request_pixels) == (DEFAULT_MAX_ROWS, DEFAULT_MAX_REQUEST_PIXELS)
