"""The study as a whole: one invocation's run, the study's one parent run above the trials, the summary and the registration."""

from __future__ import annotations

import logging
import math
import multiprocessing

import mlflow
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from cxrexp.config import TrainConfig
from cxrexp.data.store import PreparedDataset
from cxrexp.evaluation.metrics import auc_standard_error
from cxrexp.mlflow_edge import run_names, tracking
from cxrexp.mlflow_edge.signals import sigterm_as_interrupt
from cxrexp.tags import (
    BEST_RUN_ID_TAG,
    BEST_TRIAL_NUMBER_TAG,
    MODEL_URI_TAG,
    REGISTERED_VERSION_TAG,
    RUN_ID_ATTR,
    STORAGE_TAG,
    STUDY_NAME_TAG,
    STUDY_RUN_TAG,
    TRIALS_DONE_BEFORE_TAG,
    WORKER_EXIT_CODES_TAG,
)
from cxrexp.tuning.parent import claim_parent_run
from cxrexp.tuning.stale import fail_stale
from cxrexp.tuning.storage import count_done, open_study, rdb_url, redact, storage_url
from cxrexp.tuning.summary import log_study_summary, register_best
from cxrexp.tuning.trial import TrialObjective
from cxrexp.tuning.workers import (
    TrialBudget,
    close_orphans,
    optimize,
    run_workers,
    wait_for_trials_elsewhere,
)

log = logging.getLogger(__name__)

# How sharp the validation split is, said before any trial: the standard error of an AUC near this
# value, and the error above which the user is told that pruning and the winner are decided in noise.
REFERENCE_AUC = 0.9
NOISY_VALIDATION_SE = 0.02
# How often a waiting invocation looks at the other machines' last trials: a trial that ends is
# seen within this, not a whole heartbeat later (20 s, which cost a two-worker search 10 s in bench_team).
WAIT_POLL_S = 1.0


def run_study(cfg: TrainConfig, dataset: PreparedDataset, *, verbose: int = 2) -> str:
    """Run (or resume) the study up to ``cfg.n_trials`` COMPLETE+PRUNED trials; returns this invocation's run id.

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
    """This invocation's run: open or resume the study, run the missing trials, summarise, register.

    Long: the invocation run's script (find or become the study's parent run, worker processes or
    in-process trials, waiting for other machines' trials, then the summary and the registration),
    with the interrupt handling around it.
    """
    url = storage_url(cfg)
    study = open_study(cfg, dataset)
    fail_stale(study)  # trials a dead process left RUNNING: FAIL, queued again, before counting
    n_done = count_done(study)
    with tracking.step_run(
        "train", cfg, run_name=run_names.study_name(cfg, dataset.image_size),
        extra_params={"image_size": dataset.image_size, "dataset_digest": dataset.digest},
        system_metrics=cfg.system_metrics,
    ) as own:
        own_id = own.info.run_id
        mlflow.set_tags(
            {STUDY_NAME_TAG: cfg.study_name, STORAGE_TAG: redact(url), TRIALS_DONE_BEFORE_TAG: str(n_done)}
        )
        parent_id = claim_parent_run(study, rdb_url(url), own_id)
        experiment_id = MlflowClient().get_run(parent_id).info.experiment_id  # the trials sit beside their parent
        if parent_id != own_id:
            mlflow.set_tags({STUDY_RUN_TAG: parent_id,
                             "mlflow.runName": run_names.joined_study_name(cfg, dataset.image_size)})
        tracking.log_prepared_dataset(dataset, context="train")
        n_positive, n_negative = _validation_counts(dataset)
        mlflow.log_params({"val_positives": n_positive, "val_negatives": n_negative})
        reference_se = reference_auc_se(n_positive, n_negative)
        if reference_se is not None:
            mlflow.log_metric("val_auc_se_at_0_9", reference_se)
        note = validation_noise_note(n_positive, n_negative)
        if note:
            print(note)
        n_missing = max(0, cfg.n_trials - n_done)
        joined = "" if parent_id == own_id else f", under the study's parent run {parent_id}"
        print(
            f"study {cfg.study_name!r} in {redact(url)}: {n_done} of {cfg.n_trials} trials done, "
            f"running {n_missing} (run {own_id}{joined})"
        )
        while n_missing:
            _run_trials(cfg, dataset, study, parent_id, own_id, experiment_id, n_missing, verbose)
            # Other machines' trials may hold the last places: stay until they end, so a dead one is rerun here.
            if not (cfg.heartbeat and wait_for_trials_elsewhere(study, cfg.n_trials, poll_s=min(cfg.heartbeat, WAIT_POLL_S))):
                break
            n_missing = max(0, cfg.n_trials - count_done(study))
        summary_runs = tuple(dict.fromkeys((own_id, parent_id)))  # the parent shows the study as it now stands
        counts = log_study_summary(study, cfg, dataset.image_size, summary_runs)
        model_uri, version = register_best(study, cfg, dataset)
        best = study.best_trial
        client = MlflowClient()
        model_tags = {
            MODEL_URI_TAG: model_uri,
            REGISTERED_VERSION_TAG: version,
            BEST_TRIAL_NUMBER_TAG: str(best.number),
            BEST_RUN_ID_TAG: str(best.user_attrs.get(RUN_ID_ATTR)),
        }
        for run_id in summary_runs:
            for key, value in model_tags.items():
                client.set_tag(run_id, key, value)
        if parent_id != own_id and client.get_run(parent_id).info.status != "FINISHED" \
                and not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            # The parent stands for the study, which now has a model and no trial running: its own
            # invocation ended FAILED or KILLED, or was killed hard and left it RUNNING for good.
            client.set_terminated(parent_id, "FINISHED")
        precision = ""
        if cfg.objective == "roc_auc" and reference_se is not None and math.isfinite(best.value):
            best_se = auc_standard_error(min(max(best.value, 0.0), 1.0), n_positive, n_negative)
            for run_id in summary_runs:
                tracking.log_metrics({"best_value_se": best_se}, run_id=run_id)
            precision = f" +-{best_se:.3f} (1 SE)"
        print(
            f"study {cfg.study_name!r}: {counts['complete']} complete, {counts['pruned']} pruned, "
            f"{counts['fail']} failed; best trial {best.number} {cfg.objective}={best.value:.4f}{precision} "
            f"(validation split, {n_positive}/{n_negative} images); model {model_uri}"
        )
        return own_id


def _run_trials(cfg: TrainConfig, dataset: PreparedDataset, study, parent_id: str, own_id: str,
                experiment_id: str, n_missing: int, verbose: int) -> None:
    """Up to ``n_missing`` trials, in this process or in ``cfg.n_jobs`` workers; then end what dead workers left."""
    try:
        if cfg.n_jobs == 1:
            budget = TrialBudget(multiprocessing.Value("i", n_missing))
            objective = TrialObjective(cfg, dataset, parent_id, own_id, experiment_id, verbose=verbose)
            optimize(study, objective, budget, cfg.n_trials)
        else:
            exit_codes = run_workers(cfg, dataset, parent_id, own_id, experiment_id, n_missing)
            if any(exit_codes):
                log.warning("trial workers exited with codes %s", exit_codes)
                mlflow.set_tag(WORKER_EXIT_CODES_TAG, ",".join(map(str, exit_codes)))
    finally:
        if close_orphans(study, own_id, experiment_id):
            log.warning("ended trial runs a dead worker left RUNNING (marked KILLED / FAIL)")


def reference_auc_se(n_positive: int, n_negative: int) -> float | None:
    """The standard error of an AUC near ``REFERENCE_AUC`` on a split with these class counts.

    None when a class is missing: there is no AUC then (the objective is NaN and train says so).
    """
    if n_positive < 1 or n_negative < 1:
        return None
    return auc_standard_error(REFERENCE_AUC, n_positive, n_negative)


def validation_noise_note(n_positive: int, n_negative: int) -> str | None:
    """What to tell the user when the validation split is too small to rank trials; None when it is not."""
    se = reference_auc_se(n_positive, n_negative)
    if se is None or se <= NOISY_VALIDATION_SE:
        return None
    return (
        f"note: the validation split has {n_positive} positive / {n_negative} negative images, so a "
        f"validation AUC near {REFERENCE_AUC} is known to about +-{se:.3f} (1 SE, Hanley & McNeil): the "
        "pruner and the choice of the best trial cannot separate trials closer than that. A larger "
        "val_frac in preprocess sharpens both (docs/tuning.md)."
    )


def _validation_counts(dataset: PreparedDataset) -> tuple[int, int]:
    """(positive, negative) images in the validation split."""
    _, labels = dataset.split_rows("val")
    return int(labels.sum()), int(labels.size - labels.sum())
