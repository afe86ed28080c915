"""One training run inside an active MLflow run: fit, log, log the served model; and registration.

The shared trial body: the ``train`` step's single run and every Optuna trial (``cxrexp.tuning.trial``)
call ``train_and_log`` inside the run they opened, so both leave the same metrics, figures and model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import mlflow

from cxrexp.config import TrainConfig
from cxrexp.data.store import PreparedDataset
from cxrexp.evaluation import plots
from cxrexp.learn.training import validation_metrics
from cxrexp.mlflow_edge import registry, tracking
from cxrexp.tags import (
    CHALLENGER,
    LUNG_MODEL_TAG,
    META_DIGEST_KEY,
    META_TRAIN_RUN_KEY,
    MODEL_URI_TAG,
    VERSION_DIGEST_TAG,
    VERSION_TRAIN_RUN_TAG,
)


@dataclass(frozen=True)
class TrainedRun:
    """What one training run left in MLflow."""

    run_id: str
    model_uri: str
    val_metrics: dict[str, float]
    epochs_trained: int


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
    from cxrexp.learn.training import train_model
    from cxrexp.mlflow_edge import serving
    from cxrexp.mlflow_edge.epoch_logging import MlflowEpochLogger

    tracking.log_prepared_dataset(dataset, context="train")
    # Which segmenter cut the lung views ("" for whole images): filterable in the UI beside the metrics.
    mlflow.set_tag(LUNG_MODEL_TAG, dataset.spec.lung_model if dataset.spec.lungs != "none" else "")
    train_rows, train_labels = dataset.split_rows("train")
    val_rows, val_labels = dataset.split_rows("val")
    result = train_model(
        cfg, dataset.images(), dataset.image_size, train_rows, train_labels, val_rows, val_labels,
        callbacks=[MlflowEpochLogger(run_id), *extra_callbacks], verbose=verbose,
    )
    val_metrics = validation_metrics(result.val_labels, result.val_probabilities, cfg, result.threshold)
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
        segmenter=_segmenter_of(dataset),
        name="model",
        positive_label=dataset.positive_class,
        negative_label=dataset.negative_label,
        extra_metadata={
            META_DIGEST_KEY: dataset.digest,
            "threshold_rule": cfg.threshold_rule,
            META_TRAIN_RUN_KEY: run_id,
            **(model_metadata or {}),
        },
    )
    # MLflow 3 logs models as LoggedModels: models:/m-<id> is the stable URI (runs:/<id>/model also resolves).
    mlflow.set_tag(MODEL_URI_TAG, info.model_uri)
    return TrainedRun(run_id, info.model_uri, val_metrics, result.epochs_trained)


def _segmenter_of(dataset: PreparedDataset):
    """The U-Net whose masks cut the dataset's lung views (None for whole images): the served model
    carries it, so a raw file gets the very crop training saw."""
    spec = dataset.spec
    if spec.lungs == "none":
        return None
    from cxrexp.mlflow_edge.segmenter_serving import load_segmenter

    return load_segmenter(spec.lung_model)[0]


def register_model(trained: TrainedRun, cfg: TrainConfig, dataset: PreparedDataset, *,
                   alias: str | None = CHALLENGER, **tags: Any) -> str:
    """Register ``trained``'s model as ``cfg.registered_model_name`` and point ``alias`` at it (None: no alias)."""
    version = registry.register(
        trained.model_uri,
        cfg.registered_model_name,
        alias=alias,
        tags={
            VERSION_DIGEST_TAG: dataset.digest,
            VERSION_TRAIN_RUN_TAG: trained.run_id,
            **{k: round(v, 6) for k, v in trained.val_metrics.items()},
            **tags,
        },
    )
    print(f"registered {cfg.registered_model_name} version {version}" + (f" as @{alias}" if alias else ""))
    return version



__all__ = ["TrainedRun", "register_model", "train_and_log"]
