"""A Keras callback that logs each epoch's values to one MLflow run (MLflow's hyperparam example).

Logs through ``MlflowClient`` with an explicit run id, so it works for a trial's child run in any
worker process, not only for the fluent "active" run. Keras' ``auc`` is logged as ``train_auc``
so that no name means two things; ``loss``, ``val_loss``, ``val_auc`` and ``learning_rate`` keep
their Keras names.
"""

from __future__ import annotations

import math
import time

import keras
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

RENAMES = {"auc": "train_auc", "lr": "learning_rate"}
LOGGED = ("loss", "val_loss", "train_auc", "val_auc", "learning_rate")


class MlflowEpochLogger(keras.callbacks.Callback):
    """After every epoch: the ``logged`` values (by default ``loss``, ``val_loss``, ``train_auc``,
    ``val_auc``, ``learning_rate``) at step=epoch, Keras' names mapped through ``renames``."""

    def __init__(self, run_id: str, *, logged: tuple[str, ...] = LOGGED, renames: dict[str, str] | None = None):
        super().__init__()
        self.run_id = run_id
        self.client = MlflowClient()
        self.logged = logged
        self.renames = RENAMES if renames is None else renames

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        now = int(time.time() * 1000)
        metrics = []
        for key, value in (logs or {}).items():
            name = self.renames.get(key, key)
            if name not in self.logged:
                continue
            value = float(value)
            # MLflow stores NaN, but a NaN point hides the whole curve in the UI's charts.
            if math.isfinite(value):
                metrics.append(Metric(name, value, now, epoch))
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)
