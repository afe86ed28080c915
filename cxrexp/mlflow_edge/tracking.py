"""The MLflow edge: step runs, params, metrics, figures, artifacts, dataset inputs and step reuse.

Everything else in cxrexp returns values; this module (and the step modules that call it) logs them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

import cxrexp
from cxrexp.config import flat_params
from cxrexp.credentials import redact
from cxrexp.data.store import PreparedDataError, PreparedDataset, open_prepared
from cxrexp.mlflow_edge import signals
from cxrexp.tags import DIGEST_TAG, GIT_TAG, PREPARED_DIR_TAG, STEP_TAG

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(cxrexp.__file__).resolve().parents[1]  # the folder holding MLproject


def git_commit() -> str | None:
    """The checked-out commit of the project (None outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


@contextlib.contextmanager
def step_run(step: str, cfg: Any, *, run_name: str | None = None, nested: bool = False,
             extra_params: dict[str, Any] | None = None, system_metrics: bool = False) -> Iterator[mlflow.ActiveRun]:
    """One MLflow run for one pipeline step, with the config logged once and standard tags.

    Under ``mlflow run`` the run already exists (MLFLOW_RUN_ID) and is resumed. An exception ends
    the run FAILED; Ctrl-C and SIGTERM end it KILLED (``signals.sigterm_as_interrupt``), and so does
    killing the ``mlflow run`` process above it (``signals.die_with_parent``): never RUNNING.
    ``system_metrics`` turns on MLflow's system-metrics monitor for the run (None leaves MLflow's
    own setting, MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING).
    """
    if os.environ.get("MLFLOW_RUN_ID") and not nested:
        signals.die_with_parent()
    with signals.sigterm_as_interrupt(), mlflow.start_run(run_name=run_name, nested=nested,
                                                          log_system_metrics=system_metrics or None) as run:
        tags = {STEP_TAG: step}
        if run_name:
            tags["mlflow.runName"] = run_name  # also a run `mlflow run` created under a random name
        commit = git_commit()
        if commit:
            tags[GIT_TAG] = commit
        mlflow.set_tags(tags)
        log_new_params(run, {**flat_params(cfg), **(extra_params or {})})
        try:
            yield run
        except KeyboardInterrupt:
            mlflow.end_run("KILLED")  # interrupted, not broken: the UI should say so
            raise


def log_new_params(run: mlflow.ActiveRun, params: dict[str, Any]) -> None:
    """Log the params the run does not have yet.

    Under `mlflow run` the MLproject parameters are already logged, as the text the user typed
    ("1e-3", "true", and "''" for an empty string); MLflow refuses to log a parameter twice.
    """
    already = run.data.params
    mlflow.log_params({k: v for k, v in params.items() if k not in already})


def mlproject_text(value: Any) -> str:
    """A config value as an MLproject parameter: booleans as MLproject types its defaults (``false``)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _param_text(value: Any) -> str:
    text = mlproject_text(value)
    if text in ("True", "False"):  # a bool as Python printed it (runs `main` started before mlproject_text)
        return text.lower()
    return "" if text in ("''", '""') else text  # `mlflow run` logs an empty string shell-quoted


@contextlib.contextmanager
def outside_project_run() -> Iterator[None]:
    """Start a separate run (e.g. preprocess from inside train) even under ``mlflow run``.

    ``mlflow run`` sets MLFLOW_RUN_ID so the step's script resumes its run; a second, separate run
    started meanwhile would otherwise resume that same run.
    """
    saved = os.environ.pop("MLFLOW_RUN_ID", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["MLFLOW_RUN_ID"] = saved


def log_metrics(
    metrics: dict[str, float], *, prefix: str = "", step: int | None = None, model_id: str = "", dataset: Any = None,
    run_id: str | None = None,
) -> None:
    """Log finite and NaN values alike (MLflow stores NaN); None is left out.

    ``model_id`` (an MLflow 3 LoggedModel id) and ``dataset`` (an ``mlflow.data`` dataset) link the
    values to that model and dataset as well: the model's page in the UI then lists them. ``run_id``
    logs to that run instead of the active one (as do the helpers below).
    """
    clean = {f"{prefix}{k}": float(v) for k, v in metrics.items() if v is not None}
    if clean:
        mlflow.log_metrics(clean, step=step, model_id=model_id or None, dataset=dataset, run_id=run_id)


def log_figure(fig: Any, artifact_file: str, *, run_ids: tuple[str, ...] = ()) -> None:
    """Log ``fig`` to the active run (or to each of ``run_ids``), then close it."""
    import matplotlib.pyplot as plt

    if run_ids:
        client = mlflow.MlflowClient()
        for run_id in run_ids:
            client.log_figure(run_id, fig, artifact_file)
    else:
        mlflow.log_figure(fig, artifact_file)
    plt.close(fig)


def log_frame(frame: pd.DataFrame, artifact_file: str, *, run_id: str | None = None) -> None:
    """A DataFrame as a CSV artifact (readable in the UI and by pandas)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        frame.to_csv(path, index=False)
        parent = str(Path(artifact_file).parent)
        mlflow.log_artifact(str(path), artifact_path=None if parent == "." else parent, run_id=run_id)


def load_frame(run_id: str, artifact_file: str) -> pd.DataFrame | None:
    """A CSV artifact written by ``log_frame`` back as a DataFrame; None when the run has no such file."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_file, dst_path=tmp)
        except (mlflow.exceptions.MlflowException, OSError):
            return None
        return pd.read_csv(path, keep_default_na=False, na_values=[""])


def log_text(text: str, artifact_file: str, *, run_id: str | None = None) -> None:
    mlflow.log_text(text, artifact_file, run_id=run_id)


def log_prepared_dataset(dataset: PreparedDataset, context: str) -> Any:
    """The prepared dataset as an ``mlflow.data`` input, identified by its digest; returns the
    ``mlflow.data`` dataset (to link metrics to it)."""
    manifest = dataset.manifest
    frame = manifest.drop(columns=["row"]) if context == "preprocess" else manifest[manifest["split"] == context]
    source = dataset.params.get("source")
    if not source or source == "synthetic":  # generated in memory: the prepared folder is its only home
        source = str(dataset.root)
    with warnings.catch_warnings():  # MLflow's hints about integer columns do not apply to a manifest
        warnings.simplefilter("ignore", UserWarning)
        ds = mlflow.data.from_pandas(
            frame,
            source=source,
            targets="label",
            name=f"cxr-{dataset.params.get('layout', 'data')}-{dataset.image_size}px",
            digest=dataset.digest,
        )
        mlflow.log_input(ds, context=context)
    mlflow.set_tags({PREPARED_DIR_TAG: str(dataset.root), DIGEST_TAG: dataset.digest})
    return ds


def _same_params(run_params: dict[str, str], wanted: dict[str, Any]) -> bool:
    for key, value in wanted.items():
        have = run_params.get(key)
        if have is None:
            return False
        if _param_text(have) == _param_text(value):
            continue
        try:  # MLflow stores "0.1" for 0.1 and "1e-3" may come back as "0.001"
            if math.isclose(float(have), float(value)):
                continue
        except (TypeError, ValueError):
            pass
        return False
    return True


def find_finished_run(step: str, cfg: Any, *, experiment_ids: list[str] | None = None) -> Any | None:
    """The newest FINISHED run of ``step`` with exactly these parameters and this git commit, if any."""
    client = MlflowClient()
    if experiment_ids is None:
        # Honours MLFLOW_EXPERIMENT_ID/NAME (set by `mlflow run`) and mlflow.set_experiment.
        experiment_ids = [mlflow.tracking.fluent._get_experiment_id()]
    wanted = flat_params(cfg)
    commit = git_commit()
    runs = client.search_runs(
        experiment_ids,
        filter_string=f"tags.`{STEP_TAG}` = '{step}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=200,
    )
    for run in runs:
        if commit and run.data.tags.get(GIT_TAG) not in (None, commit):
            continue
        if _same_params(run.data.params, wanted):
            return run
    return None


def resolve_prepared(data: str) -> PreparedDataset:
    """``data`` is a prepared-dataset folder or the id of the preprocess run that wrote one."""
    path = Path(data).expanduser()
    if path.is_dir():
        return open_prepared(path)
    if re.fullmatch(r"[0-9a-f]{32}", data):
        try:
            run = MlflowClient().get_run(data)
        except mlflow.exceptions.MlflowException as err:
            raise PreparedDataError(f"data={data!r}: no such run in {redact(mlflow.get_tracking_uri())} ({err.message})") from err
        prepared = run.data.tags.get(PREPARED_DIR_TAG)
        if not prepared:
            raise PreparedDataError(
                f"data={data!r}: run {data} has no {PREPARED_DIR_TAG} tag; pass a preprocess run id or a prepared folder"
            )
        return open_prepared(prepared)
    raise PreparedDataError(
        f"data={data!r} is neither a prepared dataset folder nor a run id; run `mlflow run . -e preprocess` "
        "and pass its run id, or pass the folder it printed"
    )
