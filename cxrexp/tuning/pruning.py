"""Pruning: ``cfg.pruner`` as an Optuna pruner, fed by a per-epoch Keras callback."""

from __future__ import annotations

import math
import time

import keras
import numpy as np
import optuna

from cxrexp.config import PRUNERS


def make_pruner(name: str, max_epochs: int) -> optuna.pruners.BasePruner:
    """``cfg.pruner`` as an Optuna pruner.

    median/percentile: no pruning during the first 2 trials or the first 2 epochs of a trial (the
    first epochs of a CNN are noisy); a trial is pruned when its best value so far is below the
    median (percentile: below the lowest quarter) of the finished trials' values at that epoch.
    median-average: the same, against the median of the finished trials' running averages
    (``RunningAverageMedianPruner``).
    halving: successive halving with Optuna's default reduction factor 4, rungs after epochs 2, 5,
    17, ...: a trial goes on past a rung only while it is in the top quarter of the trials that
    reached that rung (the first trials at a rung only when they are its best); prunes hardest
    (benchmarks/bench_pruning.py). hyperband: budgets from 1 epoch up to ``max_epochs``.
    """
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2)
    if name == "median-average":
        return RunningAverageMedianPruner(n_startup_trials=2, n_warmup_steps=2)
    if name == "percentile":
        # Optuna's percentile is the share of trials *kept* (25.0 would prune all but the top quarter).
        return optuna.pruners.PercentilePruner(75.0, n_startup_trials=2, n_warmup_steps=2)
    if name == "halving":
        # min_resource 1 = Optuna's "auto" for fewer than 100 steps, fixed so rungs do not depend on
        # the first finished trial. Steps are 0-based epochs: rungs at steps 1, 4, 16.
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=4)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(int(max_epochs), 1), reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"pruner={name!r} is not one of {', '.join(PRUNERS)}")


class RunningAverageMedianPruner(optuna.pruners.BasePruner):
    """The median stopping rule of Google Vizier (Golovin et al., KDD 2017), for a maximised value.

    A trial is pruned at epoch s when its best value so far is below the median, over the finished
    (COMPLETE) trials that reached epoch s, of each one's *running average* up to s. Optuna's
    ``MedianPruner`` uses their values at s instead. Why the average: validation AUC on ~100 images
    jumps by a few hundredths from epoch to epoch, and the winners here often start slowly. A running
    average sits below a rising curve's current value, so a slow starter is judged against where
    the good trials were on average, not against their luckiest recent epoch. Never prunes before
    ``n_startup_trials`` finished trials or during the first ``n_warmup_steps`` epochs.
    """

    # Which trials form the reference, how each is summed up at an epoch and where the cut lies: the
    # choices a median rule makes (benchmarks/replay_pruning.py varies them in a subclass).
    reference_states: tuple[optuna.trial.TrialState, ...] = (optuna.trial.TrialState.COMPLETE,)

    def __init__(self, n_startup_trials: int = 2, n_warmup_steps: int = 2):
        self.n_startup_trials = n_startup_trials
        self.n_warmup_steps = n_warmup_steps

    def reference_value(self, trial: optuna.trial.FrozenTrial, step: int) -> float:
        """A reference trial's running average up to ``step``."""
        return float(np.mean([v for s, v in trial.intermediate_values.items() if s <= step]))

    def threshold(self, reference: list[float]) -> float:
        return float(np.median(reference))

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step < self.n_warmup_steps:
            return False
        if study.direction != optuna.study.StudyDirection.MAXIMIZE:
            raise ValueError("RunningAverageMedianPruner compares maximised values only")
        finished = study.get_trials(deepcopy=False, states=self.reference_states)
        if len(finished) < self.n_startup_trials:
            return False
        reference = [self.reference_value(t, step) for t in finished if step in t.intermediate_values]
        if not reference:
            return False
        return max(trial.intermediate_values.values()) < self.threshold(reference)


class PruningCallback(keras.callbacks.Callback):
    """Reports ``val_auc`` to the trial after each epoch and raises ``optuna.TrialPruned`` when told to.

    The reported step is the 0-based epoch. Non-finite values are not reported (Optuna would
    compare them). ``timeout_s`` > 0 stops training (keeping the best epoch so far, as early
    stopping does) once a trial has run that long; ``timed_out`` then says so.
    """

    def __init__(self, trial: optuna.trial.BaseTrial, monitor: str = "val_auc", timeout_s: float = 0.0):
        super().__init__()
        self.trial = trial
        self.monitor = monitor
        self.timeout_s = float(timeout_s)
        self.epochs_seen = 0
        self.timed_out = False
        self._started = time.monotonic()

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._started = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.epochs_seen = epoch + 1
        value = (logs or {}).get(self.monitor)
        if value is not None and math.isfinite(float(value)):
            self.trial.report(float(value), step=epoch)
            if self.trial.should_prune():
                raise optuna.TrialPruned(f"{self.monitor}={float(value):.4f} after epoch {epoch + 1}")
        if self.timeout_s > 0 and time.monotonic() - self._started > self.timeout_s:
            self.timed_out = True
            self.model.stop_training = True
