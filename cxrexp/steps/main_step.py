"""The ``main`` entry point: preprocess -> train -> evaluate, each its own MLflow run.

As in MLflow's multistep workflow example, a step that already finished with the same parameters
(and the same git commit) is reused instead of run again; steps exchange only run ids and URIs.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import mlflow

from cxrexp import tracking
from cxrexp.config import EvaluateConfig, PreprocessConfig, TrainConfig, flat_params

log = logging.getLogger(__name__)

PROJECT_URI = str(tracking.PROJECT_ROOT)


def _available(step: str) -> bool:
    return importlib.util.find_spec(f"cxrexp.steps.{step}_step") is not None


def _reusable(entry_point: str, cfg: Any) -> str | None:
    if entry_point == "preprocess":  # also checks that the prepared data and the input files are unchanged
        from cxrexp.steps import preprocess_step

        return preprocess_step.reusable_run(cfg)
    previous = tracking.find_finished_run(entry_point, cfg)
    return previous.info.run_id if previous is not None else None


def _get_or_run(entry_point: str, cfg: Any) -> str:
    previous = _reusable(entry_point, cfg)
    if previous is not None:
        print(f"[main] {entry_point}: reusing finished run {previous} (same parameters and commit)")
        return previous
    print(f"[main] {entry_point}: starting")
    with tracking.outside_project_run():
        submitted = mlflow.projects.run(
            PROJECT_URI,
            entry_point=entry_point,
            parameters={k: str(v) for k, v in flat_params(cfg).items()},
            env_manager="local",
            synchronous=True,
        )
    return submitted.run_id


def run(*, data_dir: str, image_size: int, epochs: int, n_trials: int, registered_model_name: str) -> int:
    pre_cfg = PreprocessConfig(data_dir=data_dir, image_size=image_size)
    with mlflow.start_run(run_name="main") as active:
        mlflow.set_tag(tracking.STEP_TAG, "main")
        tracking.log_new_params(
            active,
            {"data_dir": data_dir, "image_size": image_size, "epochs": epochs, "n_trials": n_trials,
             "registered_model_name": registered_model_name},
        )
        pre_run = _get_or_run("preprocess", pre_cfg)
        mlflow.set_tag("cxrexp.preprocess_run", pre_run)
        missing = [s for s in ("train", "evaluate") if not _available(s)]
        if missing:
            print(f"[main] not there yet in this version: {', '.join(missing)}; stopping after the steps that exist")
            return 0
        train_cfg = TrainConfig(
            data=pre_run, epochs=epochs, n_trials=n_trials, registered_model_name=registered_model_name
        )
        train_run = _get_or_run("train", train_cfg)
        mlflow.set_tag("cxrexp.train_run", train_run)
        # A study's best model lives in its best trial's run: the train run says where (tag).
        model_uri = mlflow.get_run(train_run).data.tags.get(tracking.MODEL_URI_TAG, f"runs:/{train_run}/model")
        eval_cfg = EvaluateConfig(model_uri=model_uri, data=pre_run)
        eval_run = _get_or_run("evaluate", eval_cfg)
        mlflow.set_tag("cxrexp.evaluate_run", eval_run)
        print(
            f"[main] done: preprocess {pre_run}, train {train_run}, evaluate {eval_run} (main run {active.info.run_id}).\n"
            f"[main] next: `mlflow ui`, then `mlflow run . -e promote --env-manager local`"
        )
    return 0

