"""The Optuna edge: a hyperparameter study as one parent MLflow run with one nested run per trial.

Only this package imports ``optuna``. The layout it leaves behind:

- an Optuna study ``cfg.study_name`` in ``cfg.storage`` (default ``sqlite:///optuna.db`` in the
  current folder, beside MLflow's default ``sqlite:///mlflow.db``; any Optuna RDB URL otherwise);
- one parent MLflow run per study, ``study <study_name> <size>px``: the run of the invocation that
  created the study, found by every later one (``parent``); tagged ``cxrexp.step=train``, with the
  base config as params, and at the end the best params (tags ``optuna.best.<name>``),
  ``best_value``, the trial table, the optimisation-history and parameter-importance figures, and
  the tag ``cxrexp.model_uri`` of the best model (what the main pipeline evaluates). A later
  invocation's own run (``... (joined)``, tag ``optuna.study_run_id``) holds the same summary;
- one nested run per trial, ``trial-007``, under the study's parent, tagged ``cxrexp.step=trial``,
  ``optuna.trial_number``, ``optuna.study_name``, ``optuna.invocation_run_id`` and finally
  ``optuna.state`` (COMPLETE / PRUNED / FAIL); its run status is FINISHED, KILLED (pruned or interrupted) or FAILED. The trial keeps the run id in its user attr
  ``mlflow_run_id``.

Re-running resumes: trials already COMPLETE or PRUNED count, only the missing ones run (under the
study's parent run); trials a dead process left RUNNING are found through Optuna's heartbeat, failed and
queued again with their parameters (``stale``). Failed trials do not count, so a re-run retries
them; within one invocation, though, every attempt (failed ones included) uses up one of the
missing slots, so a setting that always fails cannot loop forever.

The package, one module per job: ``space`` (the search space), ``pruning`` (pruner and per-epoch
callback), ``storage`` (Optuna storages; opening and resuming a study), ``locks`` (the storage-wide locks
around check-then-create), ``parent`` (the study's one parent run), ``trial`` (one trial's
nested run), ``workers`` (trial budget and worker processes), ``stale`` (trials whose process died:
failed by Optuna's heartbeat and retried), ``sampling`` (TPE seeded per trial), ``summary`` (trial
table, figures, registration of the best model) and ``study`` (``run_study``, which ties them together). The names
the rest of the project uses are re-exported here.

May import: ``cxrexp.mlflow_edge`` (a trial's body is ``training_run.train_and_log``), the core and
the base modules, MLflow and Optuna. Never a step.
"""

from cxrexp.tags import (
    EPOCHS_ATTR,
    FAIL_REASON_TAG,
    RUN_ID_ATTR,
    STATE_TAG,
    STUDY_NAME_TAG,
    TRIAL_NUMBER_TAG,
)
from cxrexp.tuning.pruning import (
    PruningCallback,
    RunningAverageMedianPruner,
    make_pruner,
)
from cxrexp.tuning.space import (
    MAX_FILTERS,
    base_widths,
    depth_range,
    doubling_filters,
    suggest_config,
)
from cxrexp.tuning.storage import (
    DEFAULT_STORAGE,
    StorageError,
    StudyMismatch,
    count_done,
    make_storage,
    open_study,
    rdb_url,
    redact,
    storage_url,
)
from cxrexp.tuning.study import run_study, validation_noise_note
from cxrexp.tuning.summary import StudyFailed, register_best, study_figures
from cxrexp.tuning.trial import TrialObjective
from cxrexp.tuning.workers import TrialBudget, close_orphans

__all__ = [
    "DEFAULT_STORAGE",
    "EPOCHS_ATTR",
    "FAIL_REASON_TAG",
    "MAX_FILTERS",
    "RUN_ID_ATTR",
    "STATE_TAG",
    "STUDY_NAME_TAG",
    "TRIAL_NUMBER_TAG",
    "PruningCallback",
    "StorageError",
    "StudyFailed",
    "StudyMismatch",
    "TrialBudget",
    "TrialObjective",
    "base_widths",
    "close_orphans",
    "count_done",
    "depth_range",
    "doubling_filters",
    "make_pruner",
    "RunningAverageMedianPruner",
    "make_storage",
    "open_study",
    "rdb_url",
    "redact",
    "register_best",
    "run_study",
    "validation_noise_note",
    "storage_url",
    "study_figures",
    "suggest_config",
]
