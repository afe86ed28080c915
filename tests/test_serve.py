"""The REAL scoring server: ``mlflow models serve`` on a registered raw-image model, over loopback.

The server is a subprocess (its own process group, killed in a finally), started from a temp
tracking store. What it answers is what docs/serving.md promises:
``{"predictions": [{"probability": p, "label": "COVID"|"Normal"}, ...]}`` with 200, and 400 with
``{"error_code": "INVALID_PARAMETER_VALUE", "message": "... row N: <reason>"}`` for bad rows.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pandas as pd
import pytest

from cxrexp.config import ImageSpec
from cxrexp.images.synthetic import SyntheticSpec, make_image
from cxrexp.learn.model import build_cnn
from cxrexp.mlflow_edge import registry
from cxrexp.mlflow_edge.serving import log_raw_image_model
from cxrexp.tags import CHALLENGER

from .conftest import temp_mlflow_store

requests = pytest.importorskip("requests")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CXR_MINI = PROJECT_ROOT.parent / "shared" / "data" / "cxr-mini"
NAME = "cxr-serve-test"
SPEC = ImageSpec(image_size=48, tile_grid=4, lungs="none")
STARTUP_TIMEOUT = 120.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _synthetic_png() -> bytes:
    image = make_image(SyntheticSpec(count=4, size=96, prevalence=0.5), 1).image
    ok, encoded = cv2.imencode(".png", image)
    assert ok
    return encoded.tobytes()


def _real_png() -> bytes:
    folder = CXR_MINI / "COVID" / "images"
    if not folder.is_dir():
        pytest.skip(f"real data not found at {CXR_MINI} (the shared cxr-mini set sits beside the project)")
    return sorted(folder.glob("*.png"))[0].read_bytes()


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group (mlflow + its uvicorn child), SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    with temp_mlflow_store(root) as uri:  # the store's artifacts (./mlruns) land in the temp folder
        keras_model = build_cnn(SPEC.image_size, (8, 16), (8,), 0.0, seed=3)
        with mlflow.start_run():
            info = log_raw_image_model(keras_model, SPEC, 0.5, keras_flavour_name=None)
        version = registry.register(info.model_uri, NAME, alias=CHALLENGER)
        model_uri = f"models:/{NAME}@{CHALLENGER}"
        local_model = mlflow.pyfunc.load_model(model_uri)  # the in-process answer to compare with

        port = _free_port()
        log_path = root / "server.log"
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "TF_CPP_MIN_LOG_LEVEL": "2"}
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
                 "-p", str(port), "-h", "127.0.0.1"],
                cwd=root, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
            )
        try:
            url = f"http://127.0.0.1:{port}"
            started = time.monotonic()
            while True:
                if process.poll() is not None:
                    pytest.fail(f"mlflow models serve exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
                try:
                    if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                        break
                except requests.ConnectionError:
                    pass
                if time.monotonic() - started > STARTUP_TIMEOUT:
                    pytest.fail(f"no answer on {url}/ping after {STARTUP_TIMEOUT:.0f} s:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
            yield {"url": url, "local_model": local_model, "version": version, "port": port, "root": root,
                   "startup_seconds": time.monotonic() - started}
        finally:
            _stop(process)


def _invoke(server, records: list[dict] | None = None, **kwargs):
    payload = kwargs.pop("json", {"dataframe_records": records})
    return requests.post(f"{server['url']}/invocations", json=payload, timeout=60, **kwargs)


@pytest.mark.parametrize("source", ["synthetic", "cxr-mini"])
def test_good_image_gets_probability_and_label(server, source):
    png = _synthetic_png() if source == "synthetic" else _real_png()
    response = _invoke(server, [{"image": _b64(png)}])
    assert response.status_code == 200, response.text
    body = response.json()
    assert list(body) == ["predictions"]
    (prediction,) = body["predictions"]
    assert set(prediction) == {"probability", "label", "lung_crop"}
    assert prediction["lung_crop"] is False  # trained on whole images
    assert 0.0 <= prediction["probability"] <= 1.0
    assert prediction["label"] == ("COVID" if prediction["probability"] >= 0.5 else "Normal")
    expected = server["local_model"].predict(pd.DataFrame({"image": [png]}))
    assert prediction["probability"] == pytest.approx(float(expected["probability"][0]), abs=1e-6)


def test_batch_keeps_row_order(server):
    synthetic, flipped = _synthetic_png(), cv2.imencode(".png", cv2.flip(cv2.imdecode(
        np.frombuffer(_synthetic_png(), np.uint8), cv2.IMREAD_GRAYSCALE), 1))[1].tobytes()
    response = _invoke(server, [{"image": _b64(synthetic)}, {"image": _b64(flipped)}, {"image": _b64(synthetic)}])
    assert response.status_code == 200, response.text
    probabilities = [p["probability"] for p in response.json()["predictions"]]
    expected = server["local_model"].predict(pd.DataFrame({"image": [synthetic, flipped, synthetic]}))
    assert probabilities == pytest.approx(expected["probability"].tolist(), abs=1e-6)


@pytest.mark.parametrize(
    "records, words",
    [
        ([{"image": _b64(b"this is a text file, not an X-ray")}], "row 0: not an image"),
        ([{"image": ""}], "row 0: empty base64 string"),
        ([{"image": "%%% not base64 %%%"}], "row 0: not base64"),
        ([{"image": _b64(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)}], "row 0: truncated or corrupt"),
        ([{"image": "GOOD"}, {"image": _b64(b"junk")}], "row 1: not an image"),  # a good row does not hide a bad one
        ([{"picture": "GOOD"}], "missing column 'image'"),
        ([{"image": 5}], "row 0: unsupported value of type"),  # MLflow's schema check used to echo these
        ([{"image": ["a", "b"]}], "row 0: unsupported value of type"),
    ],
)
def test_garbage_is_a_4xx_naming_the_row_and_the_server_keeps_serving(server, records, words):
    good = _b64(_synthetic_png())
    records = [{k: (good if v == "GOOD" else v) for k, v in record.items()} for record in records]
    response = _invoke(server, records)
    assert 400 <= response.status_code < 500, response.text
    body = response.json()
    assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert words in body["message"]
    assert "Failed to predict data" not in body["message"] and "enforce schema" not in body["message"], body
    for record in records:  # no part of the request comes back
        for value in record.values():
            text = str(value)
            assert text[:12] not in body["message"] or len(text) < 12, body["message"]
    again = _invoke(server, [{"image": good}])
    assert again.status_code == 200 and len(again.json()["predictions"]) == 1


def _synthetic_variant(index: int) -> bytes:
    image = make_image(SyntheticSpec(count=16, size=96, prevalence=0.5), index).image
    return cv2.imencode(".png", image)[1].tobytes()


def test_concurrent_requests_each_get_their_single_request_answer(server):
    """24 requests of 1-3 different images, 12 in flight at once: every answer must equal what the same
    images get one request at a time (a shared decode pool or model state that leaked between
    requests would mix rows up)."""
    from concurrent.futures import ThreadPoolExecutor

    images = [_synthetic_variant(i) for i in range(6)]
    alone = []
    for image in images:
        response = _invoke(server, [{"image": _b64(image)}])
        assert response.status_code == 200, response.text
        alone.append(response.json()["predictions"][0])
    batches = [[(k + j) % len(images) for j in range(1 + k % 3)] for k in range(24)]
    with ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(pool.map(lambda batch: _invoke(server, [{"image": _b64(images[i])} for i in batch]), batches))
    for batch, response in zip(batches, answers):
        assert response.status_code == 200, response.text
        got = response.json()["predictions"]
        assert [p["label"] for p in got] == [alone[i]["label"] for i in batch]
        assert [p["probability"] for p in got] == pytest.approx([alone[i]["probability"] for i in batch], abs=1e-6)
    assert len({round(p["probability"], 6) for p in alone}) > 1  # the images really differ


def test_not_json_is_a_400(server):
    response = requests.post(f"{server['url']}/invocations", data=b"not json",
                             headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 400
    assert "valid JSON" in response.json()["message"]


def test_documented_curl_example_works_as_written(server, tmp_path):
    """docs/serving.md's shell example, run with only the port and the file name substituted."""
    if shutil.which("curl") is None or shutil.which("base64") is None:
        pytest.skip("curl or base64 is not installed")
    text = (PROJECT_ROOT / "docs" / "serving.md").read_text(encoding="utf-8")
    found = re.search(r"<!-- curl-example -->\s*```bash\n(.*?)```", text, re.DOTALL)
    assert found, "docs/serving.md lost its <!-- curl-example --> block"
    script = found.group(1).replace("5001", str(server["port"]))
    (tmp_path / "chest-xray.png").write_bytes(_synthetic_png())
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert re.search(r'\{"predictions": \[\{"probability": [0-9.e-]+, "label": "(COVID|Normal)", "lung_crop": false\}\]\}', done.stdout), done.stdout
