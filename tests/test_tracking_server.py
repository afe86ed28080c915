"""`cxrexp server`: one MLflow tracking server on PostgreSQL with proxied artifacts, as a team runs it.

The pure half (the command line, the URI clients set) is table-driven; the PostgreSQL test starts a
real server on a free loopback port with throw-away databases and a temporary artifact folder, runs
one search from two `mlflow run` processes in two folders at once and SIGKILLs one of them, then
loads and scores the registered model from a third folder: its artifacts can only have come through
the server.
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


PLANTED_PASSWORD = "planted-Pa55word-9f3c"  # in PGPASSWORD on both machines: it must surface nowhere


def _fresh_database(admin, prefix: str) -> str:
    import sqlalchemy

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with admin.connect() as connection:
        connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    return name


def _trial_pids(study) -> dict[int, int]:
    """{pid: trial number} of the trials running now (the pid is the step process that runs it)."""
    from optuna.trial import TrialState

    from cxrexp.tags import WORKER_ATTR

    return {int(t.user_attrs[WORKER_ATTR].rsplit(":", 1)[1]): t.number for t in study.get_trials(deepcopy=False)
            if WORKER_ATTR in t.user_attrs and t.state == TrialState.RUNNING}


@pytest.mark.postgres
@pytest.mark.slow  # 1 min 44 s on a 2-core host: `python -m pytest -m slow` (README); the other server tests stay
def test_two_machines_search_one_study_through_the_server_and_survive_one_of_them_killed(tmp_path):
    """The team setup end to end: one `mlflow server` on PostgreSQL with proxied artifacts, one
    Optuna storage on PostgreSQL, two `mlflow run . -e train` started at once from two folders (two
    machines), one SIGKILLed mid-trial. Then: exactly N finished trials and N finished child runs
    under one parent, the killed trial failed and retried, one registered version @challenger that
    a third folder loads through the server, and the planted password nowhere."""
    import signal
    import time

    import mlflow
    import optuna
    import psutil
    import sqlalchemy
    from optuna.trial import TrialState

    from cxrexp import tuning
    from cxrexp.tags import CHALLENGER, PARENT_RUN_ATTR, STUDY_RUN_TAG

    postgres_or_skip()
    n_trials = 4
    admin = sqlalchemy.create_engine("postgresql+psycopg2://postgres@127.0.0.1:5432/test", isolation_level="AUTOCOMMIT")
    tracking_db, optuna_db = _fresh_database(admin, "cxrexp_server"), _fresh_database(admin, "cxrexp_optuna")
    cfg = ServerConfig(backend_store_uri=f"postgresql+psycopg2://postgres@127.0.0.1:5432/{tracking_db}",
                       artifacts_destination=str(tmp_path / "artifacts"), port=_free_port(), workers=1)
    storage = f"postgresql://postgres@127.0.0.1:5432/{optuna_db}"
    server = tracking_server.start(cfg, tmp_path / "server.log")
    machines: list[subprocess.Popen] = []
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env.update(MLFLOW_TRACKING_URI=tracking_server.tracking_uri(cfg), PYTHONPATH=str(PROJECT_ROOT),
                   PGPASSWORD=PLANTED_PASSWORD)
        folders = [tmp_path / name for name in ("machine-a", "machine-b", "machine-c")]
        for folder in folders:
            folder.mkdir()
        cli = [sys.executable, "-m", "cxrexp.cli"]
        pre = subprocess.run([*cli, "preprocess", "--synthetic-count", "80", "--synthetic-size", "64", "--image-size",
                              "32", "--workers", "1", "--lungs", "none", "--out-dir", str(folders[0] / "prepared")],
                             cwd=folders[0], env=env, capture_output=True, text=True, timeout=600)
        assert pre.returncode == 0, pre.stderr[-3000:]
        data_run = next(line.split()[-1] for line in pre.stdout.splitlines() if line.startswith("preprocess run id:"))
        train = [sys.executable, "-m", "mlflow", "run", str(PROJECT_ROOT), "-e", "train", "--env-manager", "local",
                 "--experiment-name", "cxrexp"]
        for key, value in {"data": data_run, "n_trials": n_trials, "storage": storage, "study_name": "two-machines",
                           "heartbeat": 1, "stale_after": 3, "pruner": "none", "filters": "8,16", "dense": "8",
                           "epochs": 2, "patience": 2, "lr_patience": 0, "registered_model_name": "e2e-two"}.items():
            train += ["-P", f"{key}={value}"]
        logs = [(folder / "train.out", folder / "train.err") for folder in folders[:2]]
        for folder, (out, err) in zip(folders[:2], logs):  # at once, as two machines of a Kubernetes Job would
            machines.append(subprocess.Popen(train, cwd=folder, env=env, stdout=out.open("w"), stderr=err.open("w"),
                                             start_new_session=True))

        def descendants(proc: subprocess.Popen) -> set[int]:
            try:
                return {child.pid for child in psutil.Process(proc.pid).children(recursive=True)}
            except psutil.NoSuchProcess:
                return set()

        doomed = machines[1]
        deadline = time.monotonic() + 600
        killed_trial = None
        while killed_trial is None:
            assert time.monotonic() < deadline, "machine B never ran a trial"
            assert doomed.poll() is None, f"machine B exited with {doomed.returncode}: {logs[1][1].read_text()[-3000:]}"
            try:
                study = optuna.load_study(study_name="two-machines", storage=tuning.make_storage(storage))
                held = {pid: number for pid, number in _trial_pids(study).items() if pid in descendants(doomed)}
            except KeyError:  # the study is not created yet
                held = {}
            if held:
                os.killpg(doomed.pid, signal.SIGKILL)  # mid-trial, with no chance to tidy up
                doomed.wait()
                killed_trial = next(iter(held.values()))
            time.sleep(0.2)
        assert machines[0].wait(timeout=900) == 0, logs[0][1].read_text()[-3000:]

        study = optuna.load_study(study_name="two-machines", storage=tuning.make_storage(storage))
        trials = study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        assert len(complete) == n_trials  # the study's total, over both machines
        assert trials[killed_trial].state == TrialState.FAIL
        assert any(t.system_attrs.get("failed_trial") == killed_trial for t in complete)  # retried, and finished

        client = mlflow.MlflowClient(tracking_server.tracking_uri(cfg))
        experiment = client.get_experiment_by_name("cxrexp")
        parent_id = study.user_attrs[PARENT_RUN_ATTR]
        runs = client.search_runs([experiment.experiment_id])
        kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
        assert sum(r.info.status == "FINISHED" for r in kids) == n_trials
        assert {r.info.run_id for r in runs if r.data.tags.get("cxrexp.step") == "trial"} == {r.info.run_id for r in kids}
        killed_run = client.get_run(trials[killed_trial].user_attrs["mlflow_run_id"])
        assert killed_run.info.status == "KILLED"  # ended by the heartbeat's retry, not left RUNNING
        studies = [r for r in runs if r.data.tags.get("cxrexp.step") == "train"]
        assert len(studies) == 2 and {r.data.tags.get(STUDY_RUN_TAG) for r in studies} == {None, parent_id}
        parent = client.get_run(parent_id)
        assert parent.info.run_name == "study two-machines 32px"
        assert parent.info.status == "FINISHED"  # even when the killed machine was the one whose run it is
        assert parent.data.metrics["n_trials_complete"] == n_trials  # its summary covers both machines
        assert sorted(r.info.run_name for r in kids)[0] == "trial-000"

        versions = client.search_model_versions("name = 'e2e-two'")
        assert len(versions) == 1 and client.get_model_version_by_alias("e2e-two", CHALLENGER).version == versions[0].version
        scored = subprocess.run([sys.executable, "-c", SCORE_FROM_ELSEWHERE, "models:/e2e-two@challenger"],
                                cwd=folders[2], env=env, capture_output=True, text=True, timeout=600)
        assert scored.returncode == 0, scored.stderr[-3000:]
        assert 0.0 <= float(scored.stdout.strip().splitlines()[-1].split()[-1]) <= 1.0
        for folder in folders:
            assert not (folder / "mlruns").exists() and not (folder / "mlartifacts").exists()  # all through the server
        assert any((tmp_path / "artifacts").rglob("MLmodel"))

        everything = [(tmp_path / "server.log").read_text()] + [path.read_text() for pair in logs for path in pair]
        for run in runs:
            everything += [f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items()]
        assert not [text for text in everything if PLANTED_PASSWORD in text]
    finally:
        for proc in machines:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        tracking_server.stop(server)
        with admin.connect() as connection:
            for name in (tracking_db, optuna_db):
                connection.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
