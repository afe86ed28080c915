"""Fit one model from a ``TrainConfig``: returns a ``TrainResult``, logs nothing itself.

Per-epoch logging (MLflow) and pruning (Optuna) come in as Keras callbacks from the edge modules;
they see the epoch logs ``loss``, ``auc``, ``val_loss``, ``val_auc``, ``learning_rate`` and may
stop training (``model.stop_training = True``) or raise (e.g. ``optuna.TrialPruned``), which
propagates out of ``train_model`` unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import keras
import numpy as np

from cxrexp.config import TrainConfig
from cxrexp.data.tfdata import make_dataset, predict_probabilities
from cxrexp.evaluation.metrics import (
    choose_threshold,
    confusion,
    pr_auc,
    rates,
    roc_auc,
    sensitivity_at_specificity,
)
from cxrexp.learn.devices import mixed_precision, strategy_for
from cxrexp.learn.losses import class_weights as compute_class_weights
from cxrexp.learn.model import build_cnn_from_config

HISTORY_KEYS = ("loss", "val_loss", "auc", "val_auc", "learning_rate")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: the weights are garbage and the run must not be used."""


@dataclass
class TrainResult:
    """What one training run produced.

    ``model``: the Keras model with the weights of ``best_epoch`` restored. ``history``: per-epoch
    lists for ``HISTORY_KEYS`` (``loss`` is the class-weighted training BCE, ``val_loss`` the
    unweighted validation BCE; ``learning_rate`` the rate used during that epoch).
    ``val_probabilities``: float32 (n_val,) in [0, 1] from the restored model, aligned with
    ``val_labels`` int64 (n_val,) in {0, 1}. ``threshold``: in (0, 1), chosen on the validation
    split by ``cfg.threshold_rule``. ``best_epoch``: 0-based index into the history lists (the
    ``epoch`` Keras passes to callbacks). ``best_val_auc``: Keras' (200-threshold) validation AUC at
    that epoch. ``class_weights``: ``{0: w0, 1: w1}`` computed from the training labels.
    """

    model: keras.Model
    history: dict[str, list[float]]
    val_probabilities: np.ndarray
    val_labels: np.ndarray
    threshold: float
    best_epoch: int
    epochs_trained: int
    best_val_auc: float
    class_weights: dict[int, float]


def check_schedule(cfg: TrainConfig) -> None:
    """Raise ValueError (naming the values) for settings that cannot train as intended."""
    if not (math.isfinite(cfg.learning_rate) and cfg.learning_rate > 0):
        raise ValueError(f"learning_rate={cfg.learning_rate} must be a positive number")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ValueError(f"epochs={cfg.epochs} and batch_size={cfg.batch_size} must be at least 1")
    if cfg.patience < 1:
        raise ValueError(f"patience={cfg.patience} must be at least 1 epoch")
    if not 0 <= cfg.lr_patience < cfg.patience:
        # Otherwise early stopping ends the run before the learning rate is ever reduced.
        raise ValueError(
            f"lr_patience={cfg.lr_patience} must be >= 0 and below patience={cfg.patience}, so the "
            "learning rate is reduced before early stopping ends the run "
            f"(e.g. lr_patience={max(cfg.patience // 2, 0)})"
        )
    if not 0 < cfg.lr_factor < 1:
        raise ValueError(f"lr_factor={cfg.lr_factor} must be in (0, 1) (it multiplies the learning rate)")


def _check_split(name: str, rows: np.ndarray, labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if np.asarray(rows).shape != labels.shape or labels.ndim != 1:
        raise ValueError(f"{name}: rows {np.asarray(rows).shape} and labels {labels.shape} must match (1-D)")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{name}: labels must be 0/1, found {np.unique(labels)[:10].tolist()}")
    counts = np.bincount(labels.astype(np.int64), minlength=2)
    if counts[0] == 0 or counts[1] == 0:
        raise ValueError(
            f"{name} split has {counts[0]} negatives and {counts[1]} positives: it needs both classes "
            "(validation AUC drives early stopping); check the split fractions or the data"
        )
    return labels.astype(np.int64)


def _non_finite_epochs(history: dict[str, list[float]]) -> list[int]:
    epochs = set()
    for key in ("loss", "val_loss"):
        epochs.update(i for i, value in enumerate(history.get(key, [])) if not math.isfinite(value))
    return sorted(epochs)


def train_model(
    cfg: TrainConfig,
    images: np.ndarray,
    image_size: int,
    train_rows: np.ndarray,
    train_labels: np.ndarray,
    val_rows: np.ndarray,
    val_labels: np.ndarray,
    callbacks=(),
    verbose: int = 2,
) -> TrainResult:
    """Train ``build_cnn`` on ``images[train_rows]``, early-stop on validation AUC.

    ``images``: uint8 (N, image_size, image_size), e.g. the prepared dataset's memmap; ``*_rows``
    int64 indices into it; ``*_labels`` int64 in {0, 1}. Class weights come from the training
    labels only (``cfg.class_weight``) and reach the loss as per-sample weights. ``callbacks``:
    extra ``keras.callbacks.Callback`` objects, run after the built-in ones.

    Raises ValueError for unusable settings or splits, ``TrainingDiverged`` when the loss became
    NaN/inf. Seeds everything from ``cfg.seed`` (Python, NumPy, TensorFlow).

    Long: Keras' compile, callbacks and fit with their settings, then the restore and the validation pass, in the order they run.
    """
    check_schedule(cfg)
    if images.ndim != 3 or images.shape[1:] != (image_size, image_size):
        raise ValueError(
            f"images have shape {images.shape}, expected (N, {image_size}, {image_size}): "
            "is image_size the prepared dataset's spec.image_size?"
        )
    train_labels = _check_split("train", train_rows, train_labels)
    val_labels = _check_split("val", val_rows, val_labels)

    keras.utils.set_random_seed(cfg.seed)
    strategy = strategy_for(cfg.strategy)
    batch_size = cfg.batch_size * strategy.num_replicas_in_sync  # cfg.batch_size is per replica
    weights = compute_class_weights(train_labels, cfg.class_weight, cfg.effective_beta)
    train_data = make_dataset(
        images, train_rows, train_labels, batch_size,
        shuffle=True, seed=cfg.seed, augment=cfg.augment, weights=weights,
    )
    # Validation is unweighted: val_loss is the plain BCE at the split's own prevalence (as with
    # Keras' class_weight=, which only touches the training data). AUC is a plain (unweighted)
    # metric either way, and per-class constant weights would not change it.
    val_data = make_dataset(images, val_rows, val_labels, batch_size, shuffle=False, seed=cfg.seed)

    with strategy.scope(), mixed_precision(cfg.mixed_precision):
        model = build_cnn_from_config(cfg, image_size)
        model.compile(
            optimizer=keras.optimizers.Adam(cfg.learning_rate),
            loss=keras.losses.BinaryCrossentropy(),
            metrics=[keras.metrics.AUC(name="auc")],
        )
    early_stopping = keras.callbacks.EarlyStopping(
        monitor="val_auc", mode="max", patience=cfg.patience, min_delta=0.0,
        restore_best_weights=True, verbose=int(verbose > 0),
    )
    built_in = [
        keras.callbacks.TerminateOnNaN(),
        # Also writes logs["learning_rate"] (the rate of the epoch just finished) for the callbacks
        # after it. Same improvement rule as early stopping, so the two count the same epochs.
        keras.callbacks.ReduceLROnPlateau(
            monitor="val_auc", mode="max", factor=cfg.lr_factor, patience=cfg.lr_patience,
            min_delta=0.0, verbose=int(verbose > 0),
        ),
        early_stopping,
    ]
    fit = model.fit(
        train_data,
        validation_data=val_data,
        epochs=cfg.epochs,
        callbacks=built_in + list(callbacks or ()),
        shuffle=False,  # the dataset shuffles itself (seeded); Keras cannot shuffle a tf.data.Dataset
        verbose=verbose,
    )
    history = {key: [float(v) for v in fit.history.get(key, [])] for key in HISTORY_KEYS}
    epochs_trained = len(history["loss"])

    bad_epochs = _non_finite_epochs(history)
    if bad_epochs:
        raise TrainingDiverged(
            f"the loss became NaN/inf in epoch {bad_epochs[0] + 1} of {epochs_trained} "
            f"(learning_rate={cfg.learning_rate}, batch_size={cfg.batch_size}): lower the learning "
            "rate; the weights of this run are unusable"
        )

    val_probabilities = predict_probabilities(model, images, val_rows, cfg.batch_size)
    if not np.isfinite(val_probabilities).all():
        raise TrainingDiverged(
            f"the restored model predicts NaN for {int(np.isnan(val_probabilities).sum())} validation "
            f"images (learning_rate={cfg.learning_rate}): lower the learning rate"
        )
    threshold = choose_threshold(val_labels, val_probabilities, cfg.threshold_rule, cfg.target_sensitivity,
                                 cfg.target_specificity)
    best_epoch = int(early_stopping.best_epoch)
    return TrainResult(
        model=model,
        history=history,
        val_probabilities=val_probabilities,
        val_labels=val_labels,
        threshold=float(threshold),
        best_epoch=best_epoch,
        epochs_trained=epochs_trained,
        best_val_auc=history["val_auc"][best_epoch] if history["val_auc"] else float("nan"),
        class_weights=weights,
    )


def validation_metrics(labels: np.ndarray, probabilities: np.ndarray, cfg: TrainConfig,
                       threshold: float | None = None) -> dict[str, float]:
    """Validation summaries (the split that drove early stopping: for model choice, never reported as test).

    With ``threshold`` (the model's, itself chosen on this split, so these two are optimistic) also
    ``val_sensitivity`` and ``val_specificity``: what defaults such as main's budget are chosen on,
    against promote's gates, without looking at the test split.
    """
    summary = {
        "val_roc_auc": roc_auc(labels, probabilities),
        "val_pr_auc": pr_auc(labels, probabilities),
        "val_sens_at_spec": sensitivity_at_specificity(labels, probabilities, cfg.target_specificity),
    }
    if threshold is not None:
        at = rates(confusion(labels, probabilities, threshold))
        summary.update(val_sensitivity=at["sensitivity"], val_specificity=at["specificity"])
    return summary


def objective_value(val_metrics: dict[str, float], objective: str) -> float:
    """The search objective (``TrainConfig.objective``) from ``validation_metrics``: in [0, 1] or NaN."""
    return val_metrics["val_roc_auc"] if objective == "roc_auc" else val_metrics["val_sens_at_spec"]


__all__ = [
    "HISTORY_KEYS", "TrainingDiverged", "TrainResult", "check_schedule", "objective_value", "train_model",
    "validation_metrics",
]
