"""`cxrexp server`: one MLflow tracking server on PostgreSQL with proxied artifacts, as a team runs it.

The pure half (the command line, the URI clients set) is table-driven; the PostgreSQL test starts a
real server on a free loopback port with a throw-away database and a temporary artifact folder,
trains and registers a tiny model from one process in one folder, and loads and scores it from a
second process in another folder: its artifacts can only have come through the server.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from cxrexp.config import ServerConfig
from cxrexp.mlflow_edge import tracking_server

from .conftest import postgres_or_skip

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "cfg, expected_tail, uri",
    [
        (ServerConfig(), ["--host", "127.0.0.1", "--port", "5000", "--workers", "2"], "http://127.0.0.1:5000"),
        (ServerConfig(host="0.0.0.0", port=8080, basic_auth=True),
         ["--host", "0.0.0.0", "--port", "8080", "--workers", "2", "--app-name", "basic-auth"], "http://127.0.0.1:8080"),
        (ServerConfig(artifacts_destination="s3://bucket/cxrexp"), ["--host", "127.0.0.1"], "http://127.0.0.1:5000"),
    ],
)
def test_the_server_command_proxies_artifacts_and_binds_loopback_by_default(cfg, expected_tail, uri):
    command = tracking_server.server_command(cfg, python="python")
    assert command[:4] == ["python", "-m", "mlflow", "server"]
    assert command[command.index("--backend-store-uri") + 1] == cfg.backend_store_uri
    destination = command[command.index("--artifacts-destination") + 1]
    assert destination == cfg.artifacts_destination if "://" in cfg.artifacts_destination else Path(destination).is_absolute()
    assert "--serve-artifacts" in command
    assert command[command.index("--host"):][: len(expected_tail)] == expected_tail
    assert tracking_server.tracking_uri(cfg) == uri


@pytest.mark.parametrize(
    "environ, words",
    [
        ({}, "set MLFLOW_AUTH_ADMIN_PASSWORD to the first admin password"),
        ({"MLFLOW_AUTH_ADMIN_PASSWORD": "s3cret-first"}, None),
        ({"MLFLOW_AUTH_CONFIG_PATH": "/etc/mlflow/basic_auth.ini"}, None),
    ],
)
def test_basic_auth_needs_its_first_admin_password_before_anything_starts(monkeypatch, environ, words):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flask_wtf" else real(name, *a))
    cfg = ServerConfig(basic_auth=True)
    if words is None:
        tracking_server.check_basic_auth(cfg, environ)
    else:
        with pytest.raises(tracking_server.UserError, match=words):
            tracking_server.check_basic_auth(cfg, environ)


def test_a_server_that_cannot_start_is_a_clear_error_with_its_last_lines(tmp_path):
    cfg = ServerConfig(backend_store_uri="notadb://nowhere", artifacts_destination=str(tmp_path / "art"),
                       port=_free_port(), wait=60)
    with pytest.raises(tracking_server.ServerDidNotStart, match="exited with"):
        tracking_server.start(cfg, tmp_path / "server.log")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SCORE_FROM_ELSEWHERE = """
import base64, sys
import cv2, mlflow, numpy as np, pandas as pd
png = cv2.imencode(".png", np.full((64, 64), 120, np.uint8))[1].tobytes()
model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict(pd.DataFrame({"image": [base64.b64encode(png).decode()]}))
print("probability", float(out["probability"].iloc[0]))
"""


@pytest.mark.postgres
def test_a_model_logged_through_the_server_loads_on_another_machine(tmp_path):
    import sqlalchemy

    postgres_or_skip()
    name = f"cxrexp_server_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine("postgresql+psycopg2://postgres@127.0.0.1:5432/test", isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    cfg = ServerConfig(backend_store_uri=f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}",
                       artifacts_destination=str(tmp_path / "artifacts"), port=_free_port(), workers=1)
    server = tracking_server.start(cfg, tmp_path / "server.log")
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env.update(MLFLOW_TRACKING_URI=tracking_server.tracking_uri(cfg), PYTHONPATH=str(PROJECT_ROOT))
        machine_a, machine_b = tmp_path / "machine-a", tmp_path / "machine-b"
        machine_a.mkdir()
        machine_b.mkdir()
        cli = [sys.executable, "-m", "cxrexp.cli"]
        pre = subprocess.run([*cli, "preprocess", "--synthetic-count", "80", "--synthetic-size", "64", "--image-size",
                              "32", "--workers", "1", "--out-dir", str(machine_a / "prepared")],
                             cwd=machine_a, env=env, capture_output=True, text=True, timeout=600)
        assert pre.returncode == 0, pre.stderr[-3000:]
        run_id = next(line.split()[-1] for line in pre.stdout.splitlines() if line.startswith("preprocess run id:"))
        train = subprocess.run([*cli, "train", "--data", run_id, "--filters", "8,16", "--dense", "8", "--epochs", "1",
                                "--registered-model-name", "e2e-server"],
                               cwd=machine_a, env=env, capture_output=True, text=True, timeout=600)
        assert train.returncode == 0, train.stderr[-3000:]
        assert not (machine_a / "mlruns").exists() and not (machine_a / "mlartifacts").exists()  # nothing local
        assert any((tmp_path / "artifacts").rglob("MLmodel"))  # the server stored the model
        scored = subprocess.run([sys.executable, "-c", SCORE_FROM_ELSEWHERE, "models:/e2e-server@challenger"],
                                cwd=machine_b, env=env, capture_output=True, text=True, timeout=600)
        assert scored.returncode == 0, scored.stderr[-3000:]
        probability = float(scored.stdout.strip().splitlines()[-1].split()[-1])
        assert 0.0 <= probability <= 1.0
        import mlflow

        client = mlflow.MlflowClient(tracking_server.tracking_uri(cfg))
        (run,) = client.search_runs([client.get_experiment_by_name("cxrexp").experiment_id],
                                    filter_string="tags.`cxrexp.step` = 'train'")
        assert run.info.run_name == "train 32px default" and run.info.artifact_uri.startswith("mlflow-artifacts:")
    finally:
        tracking_server.stop(server)
        with admin.connect() as connection:
            connection.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
