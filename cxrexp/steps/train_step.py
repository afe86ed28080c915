"""The ``train`` step: one training run (or an Optuna study) as MLflow runs, best model registered."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import mlflow
import numpy as np

from cxrexp import metrics, plots, registry, tracking
from cxrexp.config import SEED_IMAGE_SPEC, PreprocessConfig, TrainConfig, apply_preset
from cxrexp.store import PreparedDataError, PreparedDataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainedRun:
    """What one training run left in MLflow."""

    run_id: str
    model_uri: str
    val_metrics: dict[str, float]
    epochs_trained: int


def resolve_data(cfg: TrainConfig) -> PreparedDataset:
    """The prepared dataset to train on; with no ``data``, run or reuse ``preprocess`` first."""
    if cfg.data:
        return tracking.resolve_prepared(cfg.data)
    from cxrexp.steps import preprocess_step

    pre_cfg = PreprocessConfig()
    if cfg.preset == "seed":  # the published experiment's 299 px CLAHE(40, 8x8) images
        spec = SEED_IMAGE_SPEC
        pre_cfg = PreprocessConfig(image_size=spec.image_size, clip_limit=spec.clip_limit, tile_grid=spec.tile_grid)
    return preprocess_step.ensure(pre_cfg)


def check_compatible(cfg: TrainConfig, dataset: PreparedDataset) -> None:
    """Fail before any training starts when the data cannot train this model."""
    from cxrexp.model import max_conv_blocks

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


def validation_metrics(labels: np.ndarray, probabilities: np.ndarray, cfg: TrainConfig) -> dict[str, float]:
    """Validation summaries (the split that drove early stopping: for model choice, never reported as test)."""
    return {
        "val_roc_auc": metrics.roc_auc(labels, probabilities),
        "val_pr_auc": metrics.pr_auc(labels, probabilities),
        "val_sens_at_spec": metrics.sensitivity_at_specificity(labels, probabilities, cfg.target_specificity),
    }


def objective_value(val_metrics: dict[str, float], objective: str) -> float:
    return val_metrics["val_roc_auc"] if objective == "roc_auc" else val_metrics["val_sens_at_spec"]


def train_and_log(
    cfg: TrainConfig,
    dataset: PreparedDataset,
    run_id: str,
    *,
    extra_callbacks: Sequence[Any] = (),
    verbose: int = 2,
    model_metadata: dict[str, Any] | None = None,
) -> TrainedRun:
    """Train inside the already-active run ``run_id`` and log everything about it (the shared trial body)."""
    from cxrexp import serving
    from cxrexp.epoch_logging import MlflowEpochLogger
    from cxrexp.training import train_model

    tracking.log_prepared_dataset(dataset, context="train")
    train_rows, train_labels = dataset.split_rows("train")
    val_rows, val_labels = dataset.split_rows("val")
    result = train_model(
        cfg, dataset.images(), dataset.image_size, train_rows, train_labels, val_rows, val_labels,
        callbacks=[MlflowEpochLogger(run_id), *extra_callbacks], verbose=verbose,
    )
    val_metrics = validation_metrics(result.val_labels, result.val_probabilities, cfg)
    tracking.log_metrics(
        {
            **val_metrics,
            "best_val_auc": result.best_val_auc,
            "best_epoch": result.best_epoch,
            "epochs_trained": result.epochs_trained,
            "threshold": result.threshold,
            "class_weight_0": result.class_weights[0],
            "class_weight_1": result.class_weights[1],
        }
    )
    tracking.log_figure(plots.learning_curves_figure(result.history), "figures/learning_curves.png")
    info = serving.log_raw_image_model(
        result.model,
        dataset.spec,
        result.threshold,
        name="model",
        positive_label=dataset.positive_class,
        negative_label=dataset.negative_label,
        extra_metadata={
            "dataset_digest": dataset.digest,
            "threshold_rule": cfg.threshold_rule,
            "train_run_id": run_id,
            **(model_metadata or {}),
        },
    )
    # MLflow 3 logs models as LoggedModels: models:/m-<id> is the stable URI (runs:/<id>/model also resolves).
    mlflow.set_tag(tracking.MODEL_URI_TAG, info.model_uri)
    return TrainedRun(run_id, info.model_uri, val_metrics, result.epochs_trained)


def register_model(trained: TrainedRun, cfg: TrainConfig, dataset: PreparedDataset, **tags: Any) -> str:
    version = registry.register(
        trained.model_uri,
        cfg.registered_model_name,
        alias=registry.CHALLENGER,
        tags={
            "dataset_digest": dataset.digest,
            "train_run_id": trained.run_id,
            **{k: round(v, 6) for k, v in trained.val_metrics.items()},
            **tags,
        },
    )
    print(f"registered {cfg.registered_model_name} version {version} as @{registry.CHALLENGER}")
    return version


def run(cfg: TrainConfig, explicitly_set: set[str] | None = None) -> str:
    """Run the step; returns the run id of the train (or study) run."""
    cfg = apply_preset(cfg, explicitly_set or set())
    dataset = resolve_data(cfg)
    check_compatible(cfg, dataset)
    from cxrexp.training import check_schedule

    try:
        check_schedule(cfg)
    except ValueError as err:
        raise PreparedDataError(str(err)) from err  # a settings error: reported before any training
    if cfg.n_trials > 0:
        from cxrexp import tuning

        return tuning.run_study(cfg, dataset)
    with tracking.step_run("train", cfg, extra_params={"image_size": dataset.image_size,
                                                       "dataset_digest": dataset.digest}) as active:
        trained = train_and_log(cfg, dataset, active.info.run_id)
        version = register_model(trained, cfg, dataset)
        mlflow.set_tag("cxrexp.registered_version", version)
        print(
            f"train run {active.info.run_id}: val ROC-AUC {trained.val_metrics['val_roc_auc']:.3f} "
            f"(validation split: drove early stopping; see evaluate for test figures)"
        )
        return active.info.run_id
