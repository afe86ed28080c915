"""SIGTERM never leaves an MLflow run RUNNING: the step's own process, or the `mlflow run` above it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

# A step that would run for ten minutes: it prints its run id once the run exists, then waits.
_STEP = """
import time
from cxrexp.config import PreprocessConfig
from cxrexp.mlflow_edge import tracking
with tracking.step_run("preprocess", PreprocessConfig()) as run:
    print("run", run.info.run_id, flush=True)
    time.sleep(600)
"""


def _status(uri: str, run_id: str, settle_s: float = 60.0) -> str:
    """The run's status once it has left RUNNING (or RUNNING after ``settle_s``: the bug)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    deadline = time.monotonic() + settle_s
    while True:
        status = client.get_run(run_id).info.status
        if status != "RUNNING" or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def _run_id(stream) -> str:
    for line in stream:
        if line.startswith("run "):
            return line.split()[1]
    raise AssertionError("the step never started its run")


def _env(uri: str) -> dict[str, str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(name, None)
    return env


@pytest.mark.timeout(300)
def test_sigterm_to_a_step_ends_its_run_killed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "step.py").write_text(_STEP)
    step = subprocess.Popen([sys.executable, "step.py"], cwd=tmp_path, env=_env(uri), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        run_id = _run_id(step.stdout)
        step.send_signal(signal.SIGTERM)
        step.wait(timeout=120)
    finally:
        step.kill()
    assert step.returncode != 0
    assert _status(uri, run_id) == "KILLED"


@pytest.mark.timeout(300)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_sigterm_to_mlflow_run_ends_the_steps_run_killed(tmp_path):
    """`mlflow run` dies on SIGTERM without telling its child; the step asked the kernel for a SIGTERM
    of its own when its parent dies (signals.die_with_parent), so its run still ends KILLED."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    project = tmp_path / "project"
    project.mkdir()
    script = f"sigterm_step_{os.getpid()}_{time.monotonic_ns()}.py"  # unique: the cleanup below finds it by name
    (project / script).write_text(_STEP)
    (project / "MLproject").write_text(f"name: sigterm\nentry_points:\n  main:\n    command: \"python {script}\"\n")
    runner = subprocess.Popen([sys.executable, "-m", "mlflow", "run", str(project), "--env-manager", "local"],
                              cwd=tmp_path, env=_env(uri), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True)
    try:
        run_id = _run_id(runner.stdout)
        runner.send_signal(signal.SIGTERM)
        runner.wait(timeout=120)
        assert _status(uri, run_id) == "KILLED"
    finally:
        runner.kill()
        # The step itself, if it outlived its parent (the bug): find it by its script and stop it.
        subprocess.run(["pkill", "-f", script], check=False)
