"""The study as a whole: one parent MLflow run around the trials, the summary and the registration."""

from __future__ import annotations

import logging
import multiprocessing

import mlflow

from cxrexp import tracking
from cxrexp.config import TrainConfig
from cxrexp.store import PreparedDataset
from cxrexp.tuning.storage import count_done, open_study, redact, storage_url
from cxrexp.tuning.summary import log_study_summary, register_best
from cxrexp.tuning.trial import RUN_ID_ATTR, STUDY_NAME_TAG, TrialObjective
from cxrexp.tuning.workers import TrialBudget, close_orphans, optimize, run_workers, sigterm_as_interrupt

log = logging.getLogger(__name__)


def run_study(cfg: TrainConfig, dataset: PreparedDataset, *, verbose: int = 2) -> str:
    """Run (or resume) the study up to ``cfg.n_trials`` COMPLETE+PRUNED trials; returns the parent run id.

    ``cfg.n_jobs`` > 1 runs trials in that many spawned processes sharing the storage. Raises
    ``StudyFailed`` when no trial completed (the parent run ends FAILED), ``StudyMismatch`` when
    the named study belongs to other data or settings. Ctrl-C (or SIGTERM) ends every run it
    started KILLED; the interrupted trial is FAIL in Optuna and is retried by the next invocation.
    """
    if cfg.n_trials < 1:
        raise ValueError(f"n_trials={cfg.n_trials}: a study needs at least one trial")
    if cfg.n_jobs < 1:
        raise ValueError(f"n_jobs={cfg.n_jobs} must be at least 1")
    with sigterm_as_interrupt():
        return _run_study(cfg, dataset, verbose)


def _run_study(cfg: TrainConfig, dataset: PreparedDataset, verbose: int) -> str:
    url = storage_url(cfg)
    study = open_study(cfg, dataset)
    n_done = count_done(study)
    n_missing = max(0, cfg.n_trials - n_done)
    with tracking.step_run(
        "train", cfg, run_name=f"study-{cfg.study_name}",
        extra_params={"image_size": dataset.image_size, "dataset_digest": dataset.digest},
    ) as parent:
        parent_id = parent.info.run_id
        mlflow.set_tags(
            {STUDY_NAME_TAG: cfg.study_name, "optuna.storage": redact(url), "optuna.trials_done_before": str(n_done)}
        )
        tracking.log_prepared_dataset(dataset, context="train")
        print(
            f"study {cfg.study_name!r} in {redact(url)}: {n_done} of {cfg.n_trials} trials done, "
            f"running {n_missing} (parent run {parent_id})"
        )
        if n_missing:
            try:
                if cfg.n_jobs == 1:
                    budget = TrialBudget(multiprocessing.Value("i", n_missing))
                    objective = TrialObjective(cfg, dataset, parent_id, parent.info.experiment_id, verbose=verbose)
                    optimize(study, objective, budget, cfg.n_trials)
                else:
                    exit_codes = run_workers(cfg, dataset, parent, n_missing)
                    if any(exit_codes):
                        log.warning("trial workers exited with codes %s", exit_codes)
                        mlflow.set_tag("optuna.worker_exit_codes", ",".join(map(str, exit_codes)))
            finally:
                if close_orphans(study, parent_id):
                    log.warning("ended trial runs a dead worker left RUNNING (marked KILLED / FAIL)")
        counts = log_study_summary(study, cfg, dataset.image_size)
        model_uri, version = register_best(study, cfg, dataset)
        best = study.best_trial
        mlflow.set_tags(
            {
                tracking.MODEL_URI_TAG: model_uri,
                "cxrexp.registered_version": version,
                "optuna.best_trial_number": str(best.number),
                "optuna.best_run_id": str(best.user_attrs.get(RUN_ID_ATTR)),
            }
        )
        print(
            f"study {cfg.study_name!r}: {counts['complete']} complete, {counts['pruned']} pruned, "
            f"{counts['fail']} failed; best trial {best.number} {cfg.objective}={best.value:.4f} "
            f"(validation split); model {model_uri}"
        )
        return parent_id
