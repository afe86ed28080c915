"""The ``main`` entry point: segment (or the champion segmenter) -> preprocess -> train -> evaluate, each
its own MLflow run.

As in MLflow's multistep workflow example, a step that already finished with the same parameters
(and the same git commit) is reused instead of run again; steps exchange only run ids and URIs.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import mlflow

from cxrexp.config import (
    EvaluateConfig,
    ImageSpec,
    SEGMENTER_MODEL_NAME,
    MainConfig,
    PreprocessConfig,
    TrainConfig,
    flat_params,
)
from cxrexp.data.mask_pairs import has_masks
from cxrexp.lungs.segmenter_choice import choose_segmenter
from cxrexp.mlflow_edge import preprocess_run, registry, segmenter_run, tracking
from cxrexp.mlflow_edge.model_uri import version_uri
from cxrexp.tags import (
    CHAMPION,
    EVALUATE_RUN_TAG,
    MAIN_STEP,
    MODEL_URI_TAG,
    PREPROCESS_RUN_TAG,
    SEGMENT_RUN_OF_MAIN_TAG,
    SEGMENTER_CHOICE_TAG,
    STEP_TAG,
    TRAIN_RUN_OF_MAIN_TAG,
)

log = logging.getLogger(__name__)

PROJECT_URI = str(tracking.PROJECT_ROOT)


def _reusable(entry_point: str, cfg: Any) -> str | None:
    if entry_point == "preprocess":  # also checks that the prepared data and the input files are unchanged
        return preprocess_run.reusable_run(cfg)
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
            # As MLproject types its own defaults ("false"), so a run main started and one started by
            # hand show the same value side by side in the UI's comparison view.
            parameters={k: tracking.mlproject_text(v) for k, v in flat_params(cfg).items()},
            env_manager="local",
            synchronous=True,
        )
    return submitted.run_id


def _segmenter(cfg: MainConfig) -> str:
    """The version URI of the segmenter that cuts this main's lung views (``lungs.segmenter_choice``):
    a segment run (reused when it finished with the same parameters) or the registry's champion."""
    champion = registry.get_alias_version(SEGMENTER_MODEL_NAME, CHAMPION)
    choice = choose_segmenter(
        data_dir=cfg.data_dir, mask_dirs=cfg.mask_dirs,
        champion_uri=version_uri(SEGMENTER_MODEL_NAME, champion.version) if champion is not None else None,
        data_has_masks=bool(cfg.data_dir) and has_masks(cfg.data_dir),
    )
    print(f"[main] segmenter: {choice.reason}")
    mlflow.set_tag(SEGMENTER_CHOICE_TAG, choice.reason[:500])
    if not choice.train:
        return choice.model_uri
    seg_cfg = cfg.segment_config(choice.mask_dirs)
    seg_run = _get_or_run("segment", seg_cfg)
    mlflow.set_tag(SEGMENT_RUN_OF_MAIN_TAG, seg_run)
    return segmenter_run.registered_uri(seg_cfg, seg_run)


def run(cfg: MainConfig) -> int:
    """[segment ->] preprocess -> train -> evaluate, each its own run under one ``main`` run; returns
    the exit code. A lung view needs a segmenter (``_segmenter``); when segment runs, preprocess uses
    the very version it registered (not ``@champion``, which a better earlier segmenter may hold)."""
    with mlflow.start_run(run_name="main") as active:
        mlflow.set_tag(STEP_TAG, MAIN_STEP)
        tracking.log_new_params(active, flat_params(cfg))
        image = ImageSpec(image_size=cfg.image_size, lungs=cfg.lungs)
        if cfg.lungs != "none":
            image = replace(image, lung_model=_segmenter(cfg))
        pre_cfg = PreprocessConfig(data_dir=cfg.data_dir, exclude=cfg.exclude, image=image)
        pre_run = _get_or_run("preprocess", pre_cfg)
        mlflow.set_tag(PREPROCESS_RUN_TAG, pre_run)
        train_cfg = TrainConfig(
            data=pre_run, epochs=cfg.epochs, n_trials=cfg.n_trials, registered_model_name=cfg.registered_model_name
        )
        train_run = _get_or_run("train", train_cfg)
        mlflow.set_tag(TRAIN_RUN_OF_MAIN_TAG, train_run)
        # A study's best model lives in its best trial's run: the train run says where (tag).
        model_uri = mlflow.get_run(train_run).data.tags.get(MODEL_URI_TAG, f"runs:/{train_run}/model")
        eval_cfg = EvaluateConfig(model_uri=model_uri, data=pre_run)
        eval_run = _get_or_run("evaluate", eval_cfg)
        mlflow.set_tag(EVALUATE_RUN_TAG, eval_run)
        print(
            f"[main] done: preprocess {pre_run}, train {train_run}, evaluate {eval_run} (main run {active.info.run_id}).\n"
            f"[main] next: `mlflow ui`, then `mlflow run . -e promote --env-manager local`"
        )
    return 0

