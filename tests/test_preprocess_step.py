"""The preprocess step as an MLflow run: in-process through the CLI, and once through `mlflow run`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from cxrexp import cli
from cxrexp.data.store import open_prepared
from cxrexp.tags import DIGEST_TAG, PREPARED_DIR_TAG, STEP_TAG

from .test_pipeline import BAD, EXACT_COPY, GOOD, build_tree

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_tree(tmp_path_factory) -> Path:
    return build_tree(tmp_path_factory.mktemp("step-data"))


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An initialised, empty MLflow sqlite store: creating the tables takes seconds, copying it does not."""
    path = tmp_path_factory.mktemp("store-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture()
def store(tracking_uri, empty_store) -> str:
    """``tracking_uri`` (conftest), its database copied from the template before anything opens it."""
    shutil.copyfile(empty_store, tracking_uri.removeprefix("sqlite:///"))
    return tracking_uri


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_id_from(stdout: str) -> str:
    match = re.search(r"preprocess run id: ([0-9a-f]{32})", stdout)
    assert match, f"no run id printed in:\n{stdout}"
    return match.group(1)


def step_args(data_dir: Path, out_dir: Path, *extra: str) -> list[str]:
    return ["preprocess", "--data-dir", str(data_dir), "--out-dir", str(out_dir), "--image-size", "32",
            "--workers", "1", "--lungs", "none", *extra]


def test_step_logs_metrics_dataset_and_artifacts(store, data_tree, tmp_path, capsys):
    code, out, err = run_cli(step_args(data_tree, tmp_path / "prepared"), capsys)
    assert code == 0, err
    run = mlflow.get_run(run_id_from(out))
    assert run.info.status == "FINISHED"
    assert run.data.tags[STEP_TAG] == "preprocess"
    assert run.data.params["data_dir"] == str(data_tree) and run.data.params["image_size"] == "32"

    dataset = open_prepared(run.data.tags[PREPARED_DIR_TAG])
    manifest = dataset.manifest
    n_covid = sum(c == "COVID" for c, *_ in GOOD) + 2  # plus the exact and the near copy
    n_normal = sum(c == "Normal" for c, *_ in GOOD)
    metrics = run.data.metrics
    expected = {
        "n_images": n_covid + n_normal,
        "n_skipped": len(BAD),
        "n_duplicate_groups": 2,
        "n_class_COVID": n_covid,
        "n_class_Normal": n_normal,
        "n_train": (manifest["split"] == "train").sum(),
        "n_val": (manifest["split"] == "val").sum(),
        "n_test": (manifest["split"] == "test").sum(),
    }
    assert {k: metrics[k] for k in expected} == {k: float(v) for k, v in expected.items()}
    assert metrics["n_train"] + metrics["n_val"] + metrics["n_test"] == metrics["n_images"]
    assert min(metrics["n_val"], metrics["n_test"]) >= 1

    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1
    logged = inputs[0].dataset
    assert logged.digest == dataset.digest == run.data.tags[DIGEST_TAG]
    assert logged.source_type == "local" and str(data_tree) in logged.source
    assert {t.key: t.value for t in inputs[0].tags}.get("mlflow.data.context") == "preprocess"

    client = MlflowClient()
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "data")) == [
        "data/manifest.csv", "data/params.json", "data/skipped.csv"]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "figures")] == ["figures/enhancement.png"]
    skipped = pd.read_csv(client.download_artifacts(run.info.run_id, "data/skipped.csv", str(tmp_path)))
    assert sorted(skipped["reason"]) == sorted(reason for _, reason in BAD.values())
    assert run.data.tags.get("cxrexp.reused_prepared") == "false"
    assert EXACT_COPY[1] in out or "duplicate groups" in out  # the printed report summarises the data


def test_second_step_run_reuses_the_prepared_data(store, data_tree, tmp_path, capsys):
    args = step_args(data_tree, tmp_path / "prepared")
    first = mlflow.get_run(run_id_from(run_cli(args, capsys)[1]))
    code, out, _ = run_cli(args, capsys)
    second = mlflow.get_run(run_id_from(out))
    assert code == 0 and second.info.run_id != first.info.run_id  # each invocation is its own run
    assert second.data.tags["cxrexp.reused_prepared"] == "true" and "(reused" in out
    assert second.data.tags[DIGEST_TAG] == first.data.tags[DIGEST_TAG]
    assert second.data.metrics["n_images"] == first.data.metrics["n_images"]


def test_missing_data_dir_exits_2_and_marks_the_run_failed(store, tmp_path, capsys):
    missing = tmp_path / "no-such-folder"
    code, _, err = run_cli(step_args(missing, tmp_path / "prepared"), capsys)
    assert code == 2
    message = err.strip().splitlines()[-1]  # MLflow's own INFO lines may come first
    assert message.startswith("cxrexp preprocess: error: data folder ")
    assert str(missing) in message and "does not exist" in message and "data_dir" in message
    assert "Traceback" not in err
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert [(r.info.status, mlflow.get_experiment(r.info.experiment_id).name) for r in runs] == [("FAILED", "cxrexp")]
    assert mlflow.active_run() is None
    assert not (tmp_path / "prepared").exists() or not any((tmp_path / "prepared").iterdir())


def test_ensure_reuses_a_finished_run_until_the_files_change(store, tmp_path, capsys):
    from cxrexp.config import PreprocessConfig
    from cxrexp.mlflow_edge import preprocess_run

    from .test_pipeline import encode, smooth_image

    data = tmp_path / "data"
    for i, class_name in enumerate(["COVID", "Normal"] * 3):
        path = data / class_name / "images" / f"{class_name}-{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(smooth_image(i, 48, 48), "png8"))
    cfg = PreprocessConfig.flat(data_dir=str(data), out_dir=str(tmp_path / "prepared"), image_size=32, workers=1,
                                lungs="none")
    experiment = [mlflow.tracking.fluent._get_experiment_id()]

    first = preprocess_run.ensure(cfg)
    again = preprocess_run.ensure(cfg)
    assert again.root == first.root and len(MlflowClient().search_runs(experiment)) == 1
    assert "reusing preprocess run" in capsys.readouterr().out

    (data / "Normal" / "images" / "Normal-9.png").write_bytes(encode(smooth_image(9, 48, 48), "png8"))
    changed = preprocess_run.ensure(cfg)
    assert "made from other files" in capsys.readouterr().out
    assert len(changed.manifest) == len(first.manifest) + 1
    assert len(MlflowClient().search_runs(experiment)) == 2


@pytest.mark.timeout(400)
def test_mlflow_run_end_to_end(tmp_path, empty_store):
    """`mlflow run . -e preprocess` from the project root, into a temp sqlite store."""
    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # Own experiment with its artifacts in tmp: the default one would put them in the project's ./mlruns.
    experiment_id = MlflowClient(uri).create_experiment("e2e", artifact_location=(tmp_path / "artifacts").as_uri())
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=uri, PYTHONPATH=str(PROJECT_ROOT))
    out_dir = tmp_path / "prepared"
    command = [
        sys.executable, "-m", "mlflow", "run", ".", "-e", "preprocess", "--env-manager", "local",
        "--experiment-id", experiment_id,
        "-P", "synthetic_count=60", "-P", "image_size=32", "-P", f"out_dir={out_dir}", "-P", "lungs=none",
    ]
    done = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=360)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = MlflowClient(uri).search_runs([experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["n_images"] == 60 and run.data.metrics["n_skipped"] == 0
    assert run.data.params["synthetic_count"] == "60"
    assert open_prepared(run.data.tags[PREPARED_DIR_TAG]).digest == run.data.tags[DIGEST_TAG]
    assert Path(run.data.tags[PREPARED_DIR_TAG]).parent == out_dir
