"""The ``train`` step: one training run (or an Optuna study) as MLflow runs, best model registered."""

from __future__ import annotations

import logging
from dataclasses import replace

import mlflow
import numpy as np

from cxrexp.config import (
    SEED_IMAGE_SPEC,
    ImageSpec,
    MainConfig,
    PreprocessConfig,
    TrainConfig,
    apply_preset,
)
from cxrexp.data.store import PreparedDataError, PreparedDataset
from cxrexp.mlflow_edge import preprocess_run, run_names, segmenter_run, tracking
from cxrexp.mlflow_edge.training_run import register_model, train_and_log
from cxrexp.tags import REGISTERED_VERSION_TAG

log = logging.getLogger(__name__)


def resolve_data(cfg: TrainConfig) -> PreparedDataset:
    """The prepared dataset to train on; with no ``data``, the built-in set as ``main`` prepares it
    (a lung view cut by a segmenter trained on its own masks), each step run or reused."""
    if cfg.data:
        return tracking.resolve_prepared(cfg.data)
    # The published experiment's whole 299 px CLAHE(40, 8x8) images under the seed preset.
    image = SEED_IMAGE_SPEC if cfg.preset == "seed" else ImageSpec()
    if image.lungs != "none":
        # main's segment step, so `train` without data reuses the very segment run `main` made
        image = replace(image, lung_model=segmenter_run.ensure(MainConfig().segment_config()))
    return preprocess_run.ensure(PreprocessConfig(image=image))


def check_compatible(cfg: TrainConfig, dataset: PreparedDataset) -> None:
    """Fail before any training starts when the data cannot train this model."""
    from cxrexp.learn.model import max_conv_blocks

    size = dataset.image_size
    if len(cfg.filters) > max_conv_blocks(size):
        raise PreparedDataError(
            f"filters={','.join(map(str, cfg.filters))} has {len(cfg.filters)} conv blocks but the prepared "
            f"images are {size}x{size} px, which survive at most {max_conv_blocks(size)} 2x2 poolings: use "
            "fewer filters or prepare larger images (-P image_size=...)"
        )
    for split in ("train", "val"):
        _, labels = dataset.split_rows(split)
        counts = np.bincount(labels, minlength=2)
        if counts.min() == 0:
            raise PreparedDataError(
                f"the {split} split of {dataset.root} has {counts[1]} positive and {counts[0]} negative images: "
                "training needs both; use more data or other split fractions"
            )


def run(cfg: TrainConfig, explicitly_set: set[str] | None = None) -> str:
    """Run the step; returns the run id of the train (or study) run."""
    cfg = apply_preset(cfg, explicitly_set or set())
    dataset = resolve_data(cfg)
    check_compatible(cfg, dataset)
    from cxrexp.learn.training import check_schedule

    try:
        check_schedule(cfg)
    except ValueError as err:
        raise PreparedDataError(str(err)) from err  # a settings error: reported before any training
    if cfg.n_trials > 0:
        from cxrexp import tuning

        return tuning.run_study(cfg, dataset)
    with tracking.step_run("train", cfg, run_name=run_names.train_name(cfg, dataset.image_size),
                           extra_params={"image_size": dataset.image_size, "dataset_digest": dataset.digest},
                           system_metrics=cfg.system_metrics) as active:
        trained = train_and_log(cfg, dataset, active.info.run_id)
        version = register_model(trained, cfg, dataset)
        mlflow.set_tag(REGISTERED_VERSION_TAG, version)
        print(
            f"train run {active.info.run_id}: val ROC-AUC {trained.val_metrics['val_roc_auc']:.3f} "
            f"(validation split: drove early stopping; see evaluate for test figures)"
        )
        return active.info.run_id
