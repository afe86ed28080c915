"""Shared fixtures. Expensive things (a prepared dataset, a trained model) are made once per session."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CXR_MINI = PROJECT_ROOT.parent / "shared" / "data" / "cxr-mini"

# Quiet, deterministic TensorFlow on the 2-core CI machine.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def cxr_mini() -> Path:
    if not (CXR_MINI / "COVID" / "images").is_dir():
        pytest.skip(f"real data not found at {CXR_MINI} (the shared cxr-mini set sits beside the project)")
    return CXR_MINI


@pytest.fixture()
def tracking_uri(tmp_path, monkeypatch) -> str:
    """A fresh MLflow store (sqlite + local artifacts) for one test."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.chdir(tmp_path)  # mlruns/ artifacts and .cxrexp/ caches land in the temp folder
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


@contextlib.contextmanager
def temp_mlflow_store(root: Path):
    """A sqlite MLflow store in ``root`` (artifacts in ``root/mlruns``) for the duration of the block.

    For module- and session-scoped fixtures, where pytest's function-scoped ``monkeypatch`` is not
    available; yields the tracking URI.
    """
    import mlflow

    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        mp.chdir(root)
        mlflow.set_tracking_uri(uri)
        try:
            yield uri
        finally:
            mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def session_store(tmp_path_factory):
    """One MLflow store shared by the session-scoped pipeline fixtures (train once, use many times)."""
    root = tmp_path_factory.mktemp("session-mlflow")
    with temp_mlflow_store(root):
        yield root


def tiny_preprocess_config(out_dir: Path, **overrides):
    from cxrexp.config import PreprocessConfig

    # Whole images unless a test asks for a lung view: those need a segmenter (tests/test_lung_views.py).
    settings = dict(
        out_dir=str(out_dir), image_size=48, synthetic_count=240, synthetic_size=128,
        synthetic_prevalence=0.4, workers=1, lungs="none",
    )
    settings.update(overrides)
    return PreprocessConfig.flat(**settings)


@pytest.fixture(scope="session")
def synthetic_prepared(tmp_path_factory):
    """A small prepared synthetic dataset (48 px, 240 images), prepared once."""
    from cxrexp.data.pipeline import run_preprocess

    out = tmp_path_factory.mktemp("prepared")
    return run_preprocess(tiny_preprocess_config(out), progress=False).dataset


@pytest.fixture(autouse=True, scope="module")
def _forget_active_experiment():
    """mlflow.set_experiment in one module must not leak into the next module's fresh store
    (MLflow keeps the active experiment id in a process-wide global)."""
    before = os.environ.get("MLFLOW_EXPERIMENT_ID")
    yield
    import mlflow.tracking.fluent as fluent

    fluent._active_experiment_id = None
    # set_experiment also exports MLFLOW_EXPERIMENT_ID, which later start_run calls would obey.
    if before is None:
        os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    else:
        os.environ["MLFLOW_EXPERIMENT_ID"] = before


def postgres_or_skip(url: str = "postgresql://postgres@127.0.0.1:5432/test") -> None:
    """Skip the calling test, with the reason, when PostgreSQL does not answer at ``url``."""
    import sqlalchemy

    from cxrexp.tuning import rdb_url

    try:
        engine = sqlalchemy.create_engine(rdb_url(url), connect_args={"connect_timeout": 3})
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("select 1"))
        engine.dispose()
    except Exception as err:
        pytest.skip(f"PostgreSQL not reachable at {url} ({type(err).__name__}); start it to run this test")
