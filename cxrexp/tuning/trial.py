"""One trial = one nested MLflow run around ``mlflow_edge.training_run.train_and_log``, and the names it leaves."""

from __future__ import annotations

import logging
import math
import os
import socket

import keras
import mlflow
import optuna
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from cxrexp.config import TrainConfig, flat_params
from cxrexp.data.store import PreparedDataset
from cxrexp.learn.training import objective_value
from cxrexp.mlflow_edge import tracking, training_run
from cxrexp.tags import (
    EPOCHS_ATTR,
    FAIL_REASON_TAG,
    HEARTBEAT_ATTR,
    INVOCATION_TAG,
    PRUNED_AT_TAG,
    RETRY_OF_TAG,
    RUN_ID_ATTR,
    STATE_TAG,
    STEP_TAG,
    STUDY_NAME_TAG,
    SURPLUS_ATTR,
    TIMED_OUT_TAG,
    TRIAL_NUMBER_TAG,
    TRIAL_STEP,
    WORKER_ATTR,
)
from cxrexp.tuning.pruning import PruningCallback
from cxrexp.tuning.space import suggest_config
from cxrexp.tuning.stale import retried_trial_number

log = logging.getLogger(__name__)

# Trials that hold a place in the study's n_trials: finished, running, or queued to run (a retry).
CLAIMING_STATES = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                   optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)


class SurplusTrial(RuntimeError):
    """The study already had ``n_trials`` trials finished, running or queued when this one started."""


def is_surplus(trials: list[optuna.trial.FrozenTrial], number: int, n_trials: int) -> bool:
    """Whether trial ``number`` would exceed ``n_trials`` for the whole study, on every machine.

    Trial numbers come from the shared storage in the order the trials were created, so counting
    the claiming trials numbered below this one is the same answer on every machine, with no lock:
    a per-process budget alone let two machines that started together each run ``n_trials``.
    """
    return sum(t.number < number and t.state in CLAIMING_STATES for t in trials) >= n_trials


class TrialObjective:
    """The objective: one trial = one nested MLflow run around ``mlflow_edge.training_run.train_and_log``.

    Returns the validation objective (``training_run.objective_value``), NaN when it is undefined
    (Optuna marks the trial FAIL), raises ``optuna.TrialPruned`` from the pruning callback, and
    lets every other exception through for Optuna to record as FAIL.
    """

    def __init__(self, base: TrainConfig, dataset: PreparedDataset, parent_run_id: str, invocation_run_id: str,
                 experiment_id: str, *, verbose: int = 2):
        self.base = base
        self.dataset = dataset
        self.parent_run_id = parent_run_id  # the study's one parent run (``parent``)
        self.invocation_run_id = invocation_run_id  # the train run that runs this trial (the parent, or a joiner)
        self.experiment_id = experiment_id
        self.verbose = verbose

    def __call__(self, trial: optuna.trial.Trial) -> float:
        if is_surplus(trial.study.get_trials(deepcopy=False), trial.number, self.base.n_trials):
            trial.study.stop()  # this process is done; the trial is FAIL with the reason, and has no run
            trial.set_user_attr(SURPLUS_ATTR, True)
            raise SurplusTrial(f"trial {trial.number} not run: study {trial.study.study_name!r} already has "
                               f"{self.base.n_trials} trials finished, running or queued (n_trials counts every machine)")
        # A fresh Keras state per trial (no layer-name drift); the costly garbage collection runs
        # once, at the end of the trial, when the trial's model can be freed.
        keras.backend.clear_session(free_memory=False)
        trial_cfg = suggest_config(trial, self.base, self.dataset.image_size)
        # Created through the client, then made active: its parent is the study's one parent run,
        # which under fluent start_run(parent_run_id=...) would have to be this process's active run
        # (it is not when this invocation joined another's study).
        created = MlflowClient().create_run(
            self.experiment_id,
            run_name=f"trial-{trial.number:03d}",
            tags=resolve_tags({
                MLFLOW_PARENT_RUN_ID: self.parent_run_id,
                STEP_TAG: TRIAL_STEP,
                TRIAL_NUMBER_TAG: str(trial.number),
                STUDY_NAME_TAG: trial.study.study_name,
                INVOCATION_TAG: self.invocation_run_id,
            }),
        )
        run = mlflow.start_run(run_id=created.info.run_id, nested=True,
                               log_system_metrics=self.base.system_metrics or None)
        trial.set_user_attr(RUN_ID_ATTR, run.info.run_id)
        trial.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:{os.getpid()}")  # which machine ran it
        if self.base.heartbeat:  # other machines wait for a beating trial (workers.wait_for_trials_elsewhere)
            trial.set_user_attr(HEARTBEAT_ATTR, self.base.heartbeat)
        retry_of = retried_trial_number(trial)
        if retry_of is not None:
            mlflow.set_tag(RETRY_OF_TAG, str(retry_of))
        pruning = PruningCallback(trial, timeout_s=self.base.trial_timeout)
        state, status = "FAIL", "FAILED"
        try:
            mlflow.log_params(
                {**flat_params(trial_cfg), "image_size": self.dataset.image_size, "dataset_digest": self.dataset.digest}
            )
            trained = training_run.train_and_log(
                trial_cfg, self.dataset, run.info.run_id,
                extra_callbacks=[pruning], verbose=self.verbose,
                model_metadata={"optuna_study": trial.study.study_name, "optuna_trial": trial.number},
            )
            trial.set_user_attr(EPOCHS_ATTR, trained.epochs_trained)
            value = float(objective_value(trained.val_metrics, trial_cfg.objective))
            if pruning.timed_out:
                mlflow.set_tag(TIMED_OUT_TAG, f"stopped after {self.base.trial_timeout} s (trial_timeout)")
            if not math.isfinite(value):
                mlflow.set_tag(FAIL_REASON_TAG, f"objective {trial_cfg.objective} is undefined (NaN) on the validation split")
                return float("nan")  # Optuna records FAIL
            tracking.log_metrics({"objective_value": value})
            state, status = "COMPLETE", "FINISHED"
            return value
        except optuna.TrialPruned as pruned:
            state, status = "PRUNED", "KILLED"
            trial.set_user_attr(EPOCHS_ATTR, pruning.epochs_seen)
            mlflow.set_tag(PRUNED_AT_TAG, str(pruned))
            tracking.log_metrics({"epochs_trained": pruning.epochs_seen})
            raise
        except KeyboardInterrupt:
            status = "KILLED"  # Optuna records FAIL; the study stays resumable
            trial.set_user_attr(EPOCHS_ATTR, pruning.epochs_seen)
            raise
        except Exception as err:
            trial.set_user_attr(EPOCHS_ATTR, pruning.epochs_seen)
            mlflow.set_tag(FAIL_REASON_TAG, f"{type(err).__name__}: {err}"[:4000])
            raise
        finally:
            try:
                mlflow.set_tag(STATE_TAG, state)
            except Exception as err:  # the tracking store itself failed: still end the run below
                log.warning("could not tag trial %s run %s: %s", trial.number, run.info.run_id, err)
            finally:
                mlflow.end_run(status)
                keras.backend.clear_session(free_memory=True)
