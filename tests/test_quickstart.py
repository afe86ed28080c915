"""The README's documented path for a newcomer, end to end, from a clean store: the quick start
(`mlflow run .`, every default), then `-e promote`, then `mlflow models serve -m
models:/cxr-covid-cnn@champion`, then `cxrexp predict` with the same URI. Every command as the README
writes it (only the tracking URI and the port are set, so nothing lands in the project folder's store).

Slow (several minutes of real training on two cores): ``python -m pytest -m slow``.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pandas as pd
import pytest

from cxrexp.images.synthetic import SyntheticSpec, make_image

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_the_readme_sequence_reaches_a_served_champion(tmp_path):
    requests = pytest.importorskip("requests")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "TF_CPP_MIN_LOG_LEVEL": "2"}
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(name, None)
    mlflow = [sys.executable, "-m", "mlflow"]

    _run([*mlflow, "run", str(PROJECT_ROOT), "--env-manager", "local", "--experiment-name", "cxrexp"], env, tmp_path)
    promoted = _run([*mlflow, "run", str(PROJECT_ROOT), "-e", "promote", "--env-manager", "local",
                     "--experiment-name", "cxrexp"], env, tmp_path)
    assert "PROMOTED" in promoted.stdout and "NOT PROMOTED" not in promoted.stdout, promoted.stdout[-3000:]

    images = tmp_path / "xrays"
    images.mkdir()
    spec = SyntheticSpec(count=4, size=256, seed=7)
    for index in range(4):
        cv2.imwrite(str(images / f"film-{index}.png"), make_image(spec, index).image)

    port = _free_port()
    server = subprocess.Popen(
        [*mlflow, "models", "serve", "-m", "models:/cxr-covid-cnn@champion", "--env-manager", "local",
         "-p", str(port), "-h", "127.0.0.1"],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, "mlflow models serve exited"
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "the server never answered /ping"
            time.sleep(0.5)
        records = [{"image": base64.b64encode((images / f"film-{i}.png").read_bytes()).decode()} for i in range(4)]
        served = requests.post(f"{url}/invocations", json={"dataframe_records": records}, timeout=120)
        assert served.status_code == 200, served.text
        served_probabilities = [p["probability"] for p in served.json()["predictions"]]
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(server.pid, signal.SIGKILL)

    output = tmp_path / "predictions.csv"
    cxrexp = shutil.which("cxrexp") or str(Path(sys.executable).parent / "cxrexp")  # the README's command
    _run([cxrexp, "predict", "--model", "models:/cxr-covid-cnn@champion", str(images),
          "--output", str(output)], env, tmp_path)
    predicted = pd.read_csv(output).sort_values("file")
    assert list(predicted["file"]) == [f"film-{i}.png" for i in range(4)]
    assert predicted["probability"].tolist() == pytest.approx(served_probabilities, abs=1e-6)
