"""Trials whose process died: failed through Optuna's heartbeat, retried with the same parameters.

Why: a worker killed mid-trial (SIGKILL, the OOM killer, a machine that vanished) leaves its trial
RUNNING in Optuna and its nested run RUNNING in MLflow for good. With a heartbeat
(``TrainConfig.heartbeat``) every running trial records a beat in the shared storage; the next
trial that starts anywhere on that storage fails the trials silent for ``stale_after`` seconds
(``optuna.storages.fail_stale_trials``) and calls ``RetryStaleTrial`` for each, which ends the dead
trial's MLflow run and queues its parameters again. A live trial on another machine keeps beating,
so it is never touched; ``close_orphans`` only ever ends the trials of its own invocation.
"""

from __future__ import annotations

import logging
import warnings

import optuna
from mlflow.tracking import MlflowClient
from optuna.storages import RetryHeartbeatStaleTrialCallback

from cxrexp.tags import RUN_ID_ATTR, STATE_TAG

log = logging.getLogger(__name__)

# A trial that has killed its worker this many times more is a bug or a too-big model, not bad luck.
MAX_RETRIES = 2


def end_trial_run(trial: optuna.trial.FrozenTrial) -> str | None:
    """End the MLflow run of a trial whose process died (KILLED, ``optuna.state`` FAIL); returns its id.

    Only a run still RUNNING is touched. A tracking server that cannot be reached is logged, not
    raised: the Optuna side must still be retried, and the run can be ended later by hand.
    """
    run_id = trial.user_attrs.get(RUN_ID_ATTR)
    if not run_id:
        return None  # died before its run started
    try:
        client = MlflowClient()
        if client.get_run(run_id).info.status != "RUNNING":
            return None
        client.set_tag(run_id, STATE_TAG, "FAIL")
        client.set_terminated(run_id, "KILLED")
        return run_id
    except Exception as err:  # noqa: BLE001 (any store error: say it and go on)
        log.warning("could not end the MLflow run %s of stale trial %d: %s", run_id, trial.number, err)
        return None


def retried_trial_number(trial: optuna.trial.Trial) -> int | None:
    """The number of the stale trial that ``trial`` runs again, or None for a fresh trial."""
    frozen = trial.study._storage.get_trial(trial._trial_id)  # a live Trial no longer exposes system attrs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)


def retry(study: optuna.Study, trial: optuna.trial.FrozenTrial, max_retry: int = MAX_RETRIES) -> bool:
    """Queue ``trial``'s parameters again (WAITING) unless it was already retried ``max_retry`` times."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        history = RetryHeartbeatStaleTrialCallback.retry_history(trial)
        if len(history) >= max_retry:
            return False
        RetryHeartbeatStaleTrialCallback(max_retry=max_retry)(study, trial)
    return True


class RetryStaleTrial:
    """Optuna's ``heartbeat_stale_trial_callback``: end the dead trial's MLflow run, queue it again."""

    def __init__(self, max_retry: int = MAX_RETRIES):
        self.max_retry = max_retry

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        run_id = end_trial_run(trial)
        queued = retry(study, trial, self.max_retry)
        log.warning(
            "trial %d of study %r had no heartbeat for longer than the storage's grace period: its process "
            "died; marked FAIL%s, %s", trial.number, study.study_name,
            f" and its run {run_id} KILLED" if run_id else "",
            "queued again with the same parameters" if queued else f"not retried again (already {self.max_retry} times)",
        )


def fail_stale(study: optuna.Study) -> None:
    """Fail (and retry) the study's stale trials now; nothing when its storage has no heartbeat."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
