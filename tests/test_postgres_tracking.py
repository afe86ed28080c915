"""Team scale: the MLflow tracking store and Model Registry on PostgreSQL (127.0.0.1:5432, trust auth).

Creates a throw-away database, trains and registers a tiny model there, and drops it afterwards.
Skipped, with the reason, when PostgreSQL is not reachable.
"""

from __future__ import annotations

import uuid

import pytest

ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=3"

pytestmark = pytest.mark.postgres


@pytest.fixture()
def postgres_tracking(tmp_path, monkeypatch):
    psycopg2 = pytest.importorskip("psycopg2", reason="the postgres driver is the `test`/`postgres` extra")
    try:
        admin = psycopg2.connect(ADMIN_DSN)
    except psycopg2.OperationalError as err:
        pytest.skip(f"PostgreSQL not reachable at 127.0.0.1:5432 ({str(err).strip()[:120]}); start it to run this test")
    admin.autocommit = True
    name = f"cxrexp_mlflow_{uuid.uuid4().hex[:10]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    import mlflow

    uri = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.chdir(tmp_path)  # artifacts stay local (./mlruns in the temp folder)
    mlflow.set_tracking_uri(uri)
    try:
        yield uri
    finally:
        mlflow.set_tracking_uri(None)
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def test_train_and_registry_on_postgresql(postgres_tracking, synthetic_prepared):
    from mlflow.tracking import MlflowClient

    from cxrexp.cli import main

    code = main([
        "train", "--data", str(synthetic_prepared.root), "--epochs", "1", "--filters", "8,16",
        "--dense", "8", "--patience", "2", "--lr-patience", "1", "--registered-model-name", "pg-cnn",
    ])
    assert code == 0
    client = MlflowClient()
    version = client.get_model_version_by_alias("pg-cnn", "challenger")
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["cxrexp.dataset_digest"] == synthetic_prepared.digest
    assert "val_roc_auc" in run.data.metrics
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_auc")] == [0]
