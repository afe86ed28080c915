"""Passwords never reach params, tags, logs, messages or artifacts (cxrexp/credentials.py)."""

from __future__ import annotations

import logging
import uuid
from dataclasses import replace
from pathlib import Path

import mlflow
import pytest

from cxrexp import cli, credentials, tuning
from cxrexp.config import TrainConfig
from cxrexp.errors import ConfigError, UserError

from .conftest import postgres_or_skip


@pytest.mark.parametrize(
    "url, password, shown",
    [
        ("postgresql://user:s3cret@db:5432/x", "s3cret", "postgresql://user:***@db:5432/x"),
        ("postgresql+psycopg2://user:p%40ss@db/x", "p@ss", "postgresql+psycopg2://user:***@db/x"),
        ("postgresql://user@db:5432/x", None, "postgresql://user@db:5432/x"),
        ("postgresql+psycopg2:///?service=optuna", None, "postgresql+psycopg2:///?service=optuna"),
        ("sqlite:///optuna.db", None, "sqlite:///optuna.db"),
        ("http://alice:hunter22@tracking:5000", "hunter22", "http://alice:***@tracking:5000"),
        ("file:///tmp/mlruns", None, "file:///tmp/mlruns"),
    ],
)
def test_passwords_are_found_and_hidden(url, password, shown):
    assert credentials.url_password(url) == password
    assert credentials.redact(url) == shown


def test_a_storage_url_with_a_password_is_refused_with_the_ways_to_keep_it_out(monkeypatch):
    monkeypatch.setenv("MLFLOW_RUN_ID", "abc123")
    with pytest.raises(ConfigError) as err:
        credentials.refuse_password("postgresql://u:Tr0ub4dor@db/x", "-P storage")
    message = str(err.value)
    assert "Tr0ub4dor" not in message
    for way in ("PGPASSWORD", "~/.pgpass", "service=NAME", credentials.STORAGE_ENV):
        assert way in message
    assert "mlflow runs delete --run-id abc123" in message and "mlflow gc" in message
    credentials.refuse_password("postgresql://u@db/x", "-P storage")  # no password: fine


@pytest.mark.parametrize(
    "storage, environment, expected",
    [
        ("", None, "sqlite:///optuna.db"),
        ("", "postgresql://u:pw@db/x", "postgresql://u:pw@db/x"),  # the environment may hold it: never logged
        ("postgresql://u@db/x", "postgresql://u:pw@db/other", "postgresql://u@db/x"),  # -P storage wins
    ],
)
def test_storage_comes_from_the_flag_then_the_environment(storage, environment, expected, monkeypatch):
    if environment is None:
        monkeypatch.delenv(credentials.STORAGE_ENV, raising=False)
    else:
        monkeypatch.setenv(credentials.STORAGE_ENV, environment)
    assert tuning.storage_url(TrainConfig(storage=storage)) == expected


def test_a_password_in_the_storage_flag_is_refused_before_anything_runs():
    with pytest.raises(ConfigError, match="carries a password"):
        tuning.storage_url(TrainConfig(storage="postgresql://u:pw@db/x"))


def test_known_secrets_and_scrub():
    environ = {"PGPASSWORD": "pg-secret-1", credentials.STORAGE_ENV: "postgresql://u:url-secret-2@db/x",
               "MLFLOW_TRACKING_URI": "http://a:track-secret-3@h", "HOME": "/root"}
    secrets = credentials.known_secrets(environ)
    assert sorted(secrets) == ["pg-secret-1", "track-secret-3", "url-secret-2"]
    text = "failed: pg-secret-1 / url-secret-2 / track-secret-3 at /root"
    assert credentials.scrub(text, secrets) == "failed: *** / *** / *** at /root"


def test_the_cli_prints_no_password_from_the_environment(monkeypatch, capsys):
    monkeypatch.setenv("PGPASSWORD", "Plant3d-in-env")

    def leaky(args):
        logging.getLogger("cxrexp.test").warning("driver said: password Plant3d-in-env rejected")
        raise UserError("cannot connect with password Plant3d-in-env")

    monkeypatch.setattr(cli, "_dispatch", leaky)
    assert cli.main(["promote"]) == cli.EXIT_USAGE
    assert "Plant3d-in-env" not in capsys.readouterr().err
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "pw %s", ("Plant3d-in-env",), None)
    assert cli._ScrubSecrets(["Plant3d-in-env"]).filter(record) and record.getMessage() == "pw ***"


POSTGRES = "127.0.0.1:5432/test"


def _texts_under(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.postgres
def test_a_planted_password_reaches_no_param_tag_log_or_artifact(tracking_uri, tmp_path, synthetic_prepared,
                                                                  monkeypatch, capfd):
    """A study whose storage URL (from CXREXP_OPTUNA_STORAGE) and PGPASSWORD hold planted passwords
    (trust auth ignores them): search the MLflow store's database file, every artifact, the console
    and Optuna's own attributes for them."""
    postgres_or_skip(f"postgresql://postgres@{POSTGRES}")
    in_url, in_env = "PlantedUrlPassword-7f3a", "PlantedPgPassword-91c2"
    monkeypatch.setenv(credentials.STORAGE_ENV, f"postgresql://postgres:{in_url}@{POSTGRES}")
    monkeypatch.setenv("PGPASSWORD", in_env)
    cfg = replace(TrainConfig(dense=(8,), batch_size=32, epochs=1, patience=1, lr_patience=0, seed=7, n_trials=1),
                  study_name=f"cxrexp-secret-{uuid.uuid4().hex[:10]}", registered_model_name="m-secret")
    import optuna

    try:
        parent_id = tuning.run_study(cfg, synthetic_prepared, verbose=0)
        run = mlflow.get_run(parent_id)
        assert run.data.tags["optuna.storage"] == f"postgresql://postgres:***@{POSTGRES}"
        study = optuna.load_study(study_name=cfg.study_name, storage=tuning.make_storage(tuning.storage_url(cfg)))
        attrs = repr(study.user_attrs) + "".join(  # Optuna 5 keeps no study system_attrs
            repr(t.user_attrs) + repr(t.system_attrs) for t in study.trials)
    finally:
        try:
            optuna.delete_study(study_name=cfg.study_name, storage=tuning.make_storage(tuning.storage_url(cfg)))
        except KeyError:
            pass
    console = capfd.readouterr()
    places = {"console": (console.out + console.err).encode(), "optuna attributes": attrs.encode(),
              **_texts_under(tmp_path)}  # mlflow.db (params, tags, metrics) and mlruns/ (artifacts)
    database = next(data for name, data in places.items() if name.endswith("mlflow.db"))
    assert f"postgresql://postgres:***@{POSTGRES}".encode() in database  # the search does see tag text
    for secret in (in_url, in_env):
        leaked = [name for name, data in places.items() if secret.encode() in data]
        assert leaked == [], f"{secret} found in {leaked}"
