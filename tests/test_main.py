"""End to end: `mlflow run .` (the `main` entry point) chains preprocess -> train -> evaluate as MLflow
runs, then a second invocation reuses all three finished steps."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _mlflow_run(tmp_path: Path, uri: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    env.pop("MLFLOW_RUN_ID", None)
    cmd = [
        sys.executable, "-m", "mlflow", "run", str(PROJECT_ROOT), "--env-manager", "local",
        "--experiment-name", "main-e2e",
        "-P", "image_size=32", "-P", "epochs=2", "-P", "registered_model_name=e2e-cnn",
    ]
    return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1200)


def test_main_chains_the_steps_and_reuses_finished_ones(tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = _mlflow_run(tmp_path, uri)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    mlflow.set_tracking_uri(uri)
    try:
        client = MlflowClient()
        exp = client.get_experiment_by_name("main-e2e")
        runs = client.search_runs([exp.experiment_id])
        by_step = {}
        for run in runs:
            by_step.setdefault(run.data.tags.get("cxrexp.step"), []).append(run)
        assert {step: len(found) for step, found in by_step.items()} == {
            "main": 1, "preprocess": 1, "train": 1, "evaluate": 1
        }
        assert all(run.info.status == "FINISHED" for run in runs)
        main_run = by_step["main"][0]
        assert main_run.data.tags["cxrexp.evaluate_run"] == by_step["evaluate"][0].info.run_id
        evaluate = by_step["evaluate"][0].data
        assert 0.0 <= evaluate.metrics["test_roc_auc"] <= 1.0
        assert evaluate.metrics["test_n"] == by_step["preprocess"][0].data.metrics["n_test"]
        assert evaluate.tags["cxrexp.dataset_digest"] == by_step["preprocess"][0].data.tags["cxrexp.dataset_digest"]
        version = client.get_model_version_by_alias("e2e-cnn", "challenger")
        assert str(version.version) == "1"

        second = _mlflow_run(tmp_path, uri)
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        output = second.stdout + second.stderr
        for step in ("preprocess", "train", "evaluate"):
            assert f"[main] {step}: reusing finished run" in output, output[-3000:]
        again = client.search_runs([exp.experiment_id])
        steps = sorted(run.data.tags.get("cxrexp.step") for run in again)
        assert steps == ["evaluate", "main", "main", "preprocess", "train"]
    finally:
        mlflow.set_tracking_uri(None)


@pytest.mark.slow  # ~3.5 min of five `mlflow run` subprocesses: it pushed the default suite past 15 min
def test_main_with_a_lung_view_runs_segment_first_and_preprocesses_with_that_version(tmp_path):
    """`mlflow run . -P lungs=crop`: segment (the built-in set's masks) -> preprocess with the exact
    version segment registered -> train -> evaluate; the classifier carries that segmenter."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    env.pop("MLFLOW_RUN_ID", None)
    cmd = [sys.executable, "-m", "mlflow", "run", str(PROJECT_ROOT), "--env-manager", "local",
           "--experiment-name", "main-lungs", "-P", "image_size=32", "-P", "epochs=1",
           "-P", "registered_model_name=e2e-lungs", "-P", "lungs=crop", "-P", "seg_image_size=64",
           "-P", "seg_epochs=3"]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    mlflow.set_tracking_uri(uri)
    try:
        client = MlflowClient()
        exp = client.get_experiment_by_name("main-lungs")
        by_step = {}
        for run in client.search_runs([exp.experiment_id]):
            by_step.setdefault(run.data.tags.get("cxrexp.step"), []).append(run)
        assert {step: len(found) for step, found in by_step.items()} == {
            "main": 1, "segment": 1, "preprocess": 1, "train": 1, "evaluate": 1}
        version = by_step["segment"][0].data.tags["cxrexp.segmenter_version"]
        lung_model = f"models:/cxr-lung-seg/{version}"
        assert by_step["preprocess"][0].data.tags["cxrexp.lung_model"] == lung_model
        assert by_step["train"][0].data.tags["cxrexp.lung_model"] == lung_model
        assert by_step["main"][0].data.tags["cxrexp.segment_run"] == by_step["segment"][0].info.run_id
        from cxrexp.mlflow_edge.serving import load_classifier

        loaded = load_classifier("models:/e2e-lungs@challenger")
        assert loaded.image_spec.lungs == "crop" and loaded.image_spec.lung_model == lung_model
        assert loaded.lung_masks is not None
    finally:
        mlflow.set_tracking_uri(None)


@pytest.mark.parametrize(
    "logged, wanted, same",
    [
        ("false", False, True),  # main passes booleans as MLproject types them
        ("False", False, True),  # runs main started before that
        ("true", False, False),
        ("''", "", True),  # `mlflow run` logs an empty string shell-quoted
        ("1e-3", 0.001, True),
        ("16,32", "16,32,64", False),
    ],
)
def test_a_finished_step_is_reused_only_with_the_same_parameters(logged, wanted, same):
    from cxrexp.mlflow_edge.tracking import _same_params

    assert _same_params({"p": logged}, {"p": wanted}) == same
