"""The study's one parent run: created by the first invocation, found by every later one or other machine.

Why: each `train` invocation is a run of its own (under ``mlflow run``, the project run), and it used
to be its trials' parent, so two machines searching one study split its trials between two parents
and a resumed study between as many parents as invocations: nothing in the UI showed the study as a
whole. Now the first invocation's run becomes the study's parent and its id is kept in the study's
user attrs (``PARENT_RUN_ATTR``); every later invocation, on this machine or another, nests its trials
under that run, tags its own run with ``STUDY_RUN_TAG``, and refreshes the parent's summary when it
ends. The check-then-create runs under ``locks.study_lock``, so two machines starting at the same
moment cannot both become the parent.
"""

from __future__ import annotations

import logging

import optuna
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cxrexp.tags import PARENT_RUN_ATTR, STUDY_NAME_TAG
from cxrexp.tuning.locks import study_lock

log = logging.getLogger(__name__)


def usable_parent(run_id: str | None, study_name: str) -> str | None:
    """Why the recorded parent ``run_id`` cannot hold this study's trials; None when it can.

    A run deleted in the UI, one in another tracking store (the study was run against another
    MLflow), or a run of another study (a study copied with its user attrs) is replaced.
    """
    if not run_id:
        return "no parent run recorded yet"
    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException as err:
        return f"its recorded parent run {run_id} is not in this tracking store ({err.error_code})"
    if run.info.lifecycle_stage != "active":
        return f"its recorded parent run {run_id} was deleted"
    if run.data.tags.get(STUDY_NAME_TAG) != study_name:
        return f"its recorded parent run {run_id} belongs to study {run.data.tags.get(STUDY_NAME_TAG)!r}"
    return None


def claim_parent_run(study: optuna.Study, url: str, own_run_id: str) -> str:
    """The study's parent run id: the recorded one when usable, else ``own_run_id``, recorded as it.

    ``url`` is the storage's URL with an installed driver (``storage.rdb_url``): the lock is taken
    there. ``own_run_id`` must already carry the study-name tag (so a machine that finds it can check it).
    """
    with study_lock(url, study.study_name):
        recorded = study.user_attrs.get(PARENT_RUN_ATTR)
        problem = usable_parent(recorded, study.study_name)
        if problem is None:
            return recorded
        if recorded:
            log.warning("study %r: %s; run %s is its parent from now on", study.study_name, problem, own_run_id)
        study.set_user_attr(PARENT_RUN_ATTR, own_run_id)
        return own_run_id
