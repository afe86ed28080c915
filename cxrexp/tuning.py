"""The Optuna edge: a hyperparameter study as one parent MLflow run with one nested run per trial.

Only this module imports ``optuna``. The layout it leaves behind:

- an Optuna study ``cfg.study_name`` in ``cfg.storage`` (default ``sqlite:///optuna.db`` in the
  current folder, beside MLflow's default ``sqlite:///mlflow.db``; any Optuna RDB URL otherwise);
- one parent MLflow run per invocation, ``study-<study_name>``, tagged ``cxrexp.step=train``, with
  the base config as params, and at the end the best params (``best_<name>``), ``best_value``, the
  trial table, the optimisation-history and parameter-importance figures, and the tag
  ``cxrexp.model_uri`` of the best model (what the main pipeline evaluates);
- one nested run per trial, ``trial-007``, tagged ``cxrexp.step=trial``, ``optuna.trial_number``,
  ``optuna.study_name`` and finally ``optuna.state`` (COMPLETE / PRUNED / FAIL); its run status is
  FINISHED, KILLED (pruned or interrupted) or FAILED. The trial keeps the run id in its user attr
  ``mlflow_run_id``.

Re-running resumes: trials already COMPLETE or PRUNED count, only the missing ones run (under a
new parent run). Failed trials do not count, so a re-run retries them; within one invocation,
though, every attempt (failed ones included) uses up one of the missing slots, so a setting that
always fails cannot loop forever.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import multiprocessing
import os
import signal
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

import keras
import mlflow
import numpy as np
import optuna
from mlflow.tracking import MlflowClient
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState

from cxrexp import registry, tracking
from cxrexp.config import CLASS_WEIGHT_SCHEMES, TrainConfig, flat_params
from cxrexp.steps import train_step
from cxrexp.store import PreparedDataError, PreparedDataset, open_prepared

log = logging.getLogger(__name__)

DEFAULT_STORAGE = "sqlite:///optuna.db"
SQLITE_TIMEOUT_S = 60  # several worker processes write one sqlite file: wait for the lock, do not fail
STATE_TAG = "optuna.state"
TRIAL_NUMBER_TAG = "optuna.trial_number"
STUDY_NAME_TAG = "optuna.study_name"
FAIL_REASON_TAG = "optuna.fail_reason"
RUN_ID_ATTR = "mlflow_run_id"
EPOCHS_ATTR = "epochs_trained"
TRIAL_STEP = "trial"
DONE_STATES = (TrialState.COMPLETE, TrialState.PRUNED)

# Search space bounds.
TINY_IMAGE_SIZE = 64  # at or below this, narrower first blocks suffice
TINY_BASE_WIDTHS = (8, 16, 32)
BASE_WIDTHS = (16, 32, 64)
MIN_BLOCKS, MAX_BLOCKS = 3, 5
MAX_FILTERS = 256  # the published model's widest block; wider is slow on CPU for little gain
DROPOUT_RANGE = (0.0, 0.5)
LEARNING_RATE_RANGE = (1e-4, 3e-3)

# Trial values depend on these base settings: resuming a study with other values would mix
# incomparable trials. (Searched fields and run management may differ between invocations.)
SEARCHED_FIELDS = ("filters", "dropout", "class_weight", "learning_rate")
MANAGEMENT_FIELDS = (
    "data", "n_trials", "study_name", "storage", "pruner", "n_jobs", "trial_timeout", "registered_model_name",
)


class StudyFailed(RuntimeError):
    """The study has no COMPLETE trial, so there is no model to register."""


# The two below subclass PreparedDataError, which the CLI reports as a user error (message, exit 2):
# like a dataset that cannot train the model, they are settings to fix before anything runs.
class StudyMismatch(PreparedDataError):
    """An existing study of that name was run on other data or with other base settings."""


class StorageError(PreparedDataError):
    """The Optuna storage URL cannot be opened (bad URL, missing driver, server down)."""


# --------------------------------------------------------------------------- search space


def base_widths(image_size: int) -> tuple[int, ...]:
    """Choices for the first block's filter count: narrower for tiny (<= 64 px) images."""
    return TINY_BASE_WIDTHS if image_size <= TINY_IMAGE_SIZE else BASE_WIDTHS


def depth_range(image_size: int) -> tuple[int, int]:
    """(fewest, most) conv blocks: 3-5, capped by the pools the image survives, never below 2."""
    from cxrexp.model import max_conv_blocks

    cap = max_conv_blocks(image_size)
    low = max(2, min(MIN_BLOCKS, cap))
    return low, max(low, min(MAX_BLOCKS, cap))


def doubling_filters(base_width: int, n_blocks: int) -> tuple[int, ...]:
    """``(16, 4)`` -> ``(16, 32, 64, 128)``; each width capped at ``MAX_FILTERS``."""
    return tuple(min(base_width * 2**i, MAX_FILTERS) for i in range(n_blocks))


def suggest_config(trial: optuna.trial.BaseTrial, base: TrainConfig, image_size: int) -> TrainConfig:
    """The whole search space: every ``trial.suggest_*`` of the project is here.

    Searched: ``base_width`` (first block's filters, doubling per block), ``n_blocks``
    (``depth_range``), ``dropout`` in [0, 0.5], ``class_weight`` (a scheme name) and a
    log-uniform ``learning_rate`` in [1e-4, 3e-3]. Everything else comes from ``base``.
    """
    low, high = depth_range(image_size)
    base_width = trial.suggest_categorical("base_width", base_widths(image_size))
    n_blocks = trial.suggest_int("n_blocks", low, high)
    dropout = trial.suggest_float("dropout", *DROPOUT_RANGE)
    class_weight = trial.suggest_categorical("class_weight", CLASS_WEIGHT_SCHEMES)
    learning_rate = trial.suggest_float("learning_rate", *LEARNING_RATE_RANGE, log=True)
    return replace(
        base,
        filters=doubling_filters(int(base_width), n_blocks),
        dropout=float(dropout),
        class_weight=str(class_weight),
        learning_rate=float(learning_rate),
    )


# --------------------------------------------------------------------------- pruning


def make_pruner(name: str, max_epochs: int) -> optuna.pruners.BasePruner:
    """``cfg.pruner`` as an Optuna pruner.

    median/percentile: no pruning during the first 2 trials or the first 2 epochs of a trial (the
    first epochs of a CNN are noisy); percentile prunes only the bottom quarter. halving: successive
    halving with Optuna's default reduction factor 4, rungs after epochs 2, 5, 17, ...: a trial goes on
    past a rung only while it is in the top quarter of the trials that reached that rung (the first
    trials at a rung only when they are its best); prunes hardest (benchmarks/bench_pruning.py).
    hyperband: budgets from 1 epoch up to ``max_epochs``.
    """
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2)
    if name == "percentile":
        return optuna.pruners.PercentilePruner(25.0, n_startup_trials=2, n_warmup_steps=2)
    if name == "halving":
        # min_resource 1 = Optuna's "auto" for fewer than 100 steps, fixed so rungs do not depend on
        # the first finished trial. Steps are 0-based epochs: rungs at steps 1, 4, 16.
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=4)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(int(max_epochs), 1), reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"pruner={name!r} is not one of median, percentile, halving, hyperband, none")


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


# --------------------------------------------------------------------------- storage and study


def storage_url(cfg: TrainConfig) -> str:
    return cfg.storage or DEFAULT_STORAGE


def redact(url: str) -> str:
    """The URL without its password (for tags and messages)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a SQLAlchemy URL: say nothing about it rather than leak it
        return url.split("@")[-1] if "@" in url else url


def rdb_url(url: str) -> str:
    """``url`` with a PostgreSQL driver that is installed.

    SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3; with only psycopg2 installed that
    fails, so such URLs get ``postgresql+psycopg2://``. Other URLs pass unchanged.
    """
    import importlib.util

    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # not SQLAlchemy's syntax: let RDBStorage report it
        return url
    if parsed.drivername == "postgresql" and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        return parsed.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
    return url


def make_storage(url: str) -> optuna.storages.RDBStorage:
    """An Optuna RDB storage; sqlite gets a long lock timeout so several processes can share it."""
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    try:
        return optuna.storages.RDBStorage(rdb_url(url), engine_kwargs=engine_kwargs)
    except Exception as err:  # SQLAlchemy/driver errors: say which storage and what to do
        raise StorageError(
            f"cannot open the Optuna storage {redact(url)!r}: {type(err).__name__}: {err}. Pass --storage with an "
            "RDB URL Optuna supports (sqlite:///optuna.db, postgresql://user@host:5432/db, mysql://...)"
        ) from err


def sampler_seed(seed: int, n_existing_trials: int, worker: int) -> int:
    """``seed`` for a fresh study's only worker; otherwise a value derived from all three.

    A resumed study or a second worker seeded with ``seed`` itself would redraw the very
    parameters of the first trials (TPE's start-up trials are random draws from the seeded RNG).
    """
    if n_existing_trials == 0 and worker == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(n_existing_trials), int(worker)]).generate_state(1)[0])


def defining_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The base settings a study's trial values depend on (JSON-able)."""
    return {k: v for k, v in flat_params(cfg).items() if k not in SEARCHED_FIELDS + MANAGEMENT_FIELDS}


def open_study(cfg: TrainConfig, dataset: PreparedDataset, *, worker: int = 0, create: bool = True) -> optuna.Study:
    """Create or load ``cfg.study_name`` in ``storage_url(cfg)`` (maximising) with the seeded TPE sampler.

    The first invocation records the dataset digest and the defining base settings in the study's
    user attrs; a later one with other values raises ``StudyMismatch`` (mixing them would compare
    trials that are not comparable).
    """
    url = storage_url(cfg)
    storage = make_storage(url)
    pruner = make_pruner(cfg.pruner, cfg.epochs)
    if create:
        study = optuna.create_study(
            storage=storage, study_name=cfg.study_name, direction="maximize", load_if_exists=True, pruner=pruner,
        )
    else:
        study = optuna.load_study(study_name=cfg.study_name, storage=storage, pruner=pruner)
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise StudyMismatch(
            f"study {cfg.study_name!r} in {redact(url)} minimises; cxrexp maximises {cfg.objective}: use another --study-name"
        )
    wanted = {"dataset_digest": dataset.digest, "image_size": dataset.image_size, "settings": defining_settings(cfg)}
    have = study.user_attrs
    if create and not have.get("dataset_digest"):
        for key, value in wanted.items():
            study.set_user_attr(key, value)
    elif have.get("dataset_digest"):
        changed = [k for k in ("dataset_digest", "image_size") if have.get(k) != wanted[k]]
        old_settings = have.get("settings", {})
        changed += [
            f"{k} ({old_settings.get(k)!r} -> {v!r})"
            for k, v in wanted["settings"].items()
            if k in old_settings and str(old_settings[k]) != str(v)
        ]
        if changed:
            raise StudyMismatch(
                f"study {cfg.study_name!r} in {redact(url)} already holds trials run with other "
                f"{', '.join(changed)}: resuming would compare trials that are not comparable; use a new --study-name"
            )
    n_existing = len(study.get_trials(deepcopy=False))
    study.sampler = optuna.samplers.TPESampler(seed=sampler_seed(cfg.seed, n_existing, worker))
    return study


def count_done(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=DONE_STATES))


# --------------------------------------------------------------------------- one trial


class TrialObjective:
    """The objective: one trial = one nested MLflow run around ``train_step.train_and_log``.

    Returns the validation objective (``train_step.objective_value``), NaN when it is undefined
    (Optuna marks the trial FAIL), raises ``optuna.TrialPruned`` from the pruning callback, and
    lets every other exception through for Optuna to record as FAIL.
    """

    def __init__(self, base: TrainConfig, dataset: PreparedDataset, parent_run_id: str, experiment_id: str,
                 *, verbose: int = 2):
        self.base = base
        self.dataset = dataset
        self.parent_run_id = parent_run_id
        self.experiment_id = experiment_id
        self.verbose = verbose

    def __call__(self, trial: optuna.trial.Trial) -> float:
        # A fresh Keras state per trial (no layer-name drift); the costly garbage collection runs
        # once, at the end of the trial, when the trial's model can be freed.
        keras.backend.clear_session(free_memory=False)
        trial_cfg = suggest_config(trial, self.base, self.dataset.image_size)
        run = mlflow.start_run(
            run_name=f"trial-{trial.number:03d}",
            experiment_id=self.experiment_id,
            parent_run_id=self.parent_run_id,
            nested=True,
            tags={
                tracking.STEP_TAG: TRIAL_STEP,
                TRIAL_NUMBER_TAG: str(trial.number),
                STUDY_NAME_TAG: trial.study.study_name,
            },
        )
        trial.set_user_attr(RUN_ID_ATTR, run.info.run_id)
        pruning = PruningCallback(trial, timeout_s=self.base.trial_timeout)
        state, status = "FAIL", "FAILED"
        try:
            mlflow.log_params(
                {**flat_params(trial_cfg), "image_size": self.dataset.image_size, "dataset_digest": self.dataset.digest}
            )
            trained = train_step.train_and_log(
                trial_cfg, self.dataset, run.info.run_id,
                extra_callbacks=[pruning], verbose=self.verbose,
                model_metadata={"optuna_study": trial.study.study_name, "optuna_trial": trial.number},
            )
            trial.set_user_attr(EPOCHS_ATTR, trained.epochs_trained)
            value = float(train_step.objective_value(trained.val_metrics, trial_cfg.objective))
            if pruning.timed_out:
                mlflow.set_tag("optuna.timed_out", f"stopped after {self.base.trial_timeout} s (trial_timeout)")
            if not math.isfinite(value):
                mlflow.set_tag(FAIL_REASON_TAG, f"objective {trial_cfg.objective} is undefined (NaN) on the validation split")
                return float("nan")  # Optuna records FAIL
            tracking.log_metrics({"objective_value": value})
            state, status = "COMPLETE", "FINISHED"
            return value
        except optuna.TrialPruned as pruned:
            state, status = "PRUNED", "KILLED"
            trial.set_user_attr(EPOCHS_ATTR, pruning.epochs_seen)
            mlflow.set_tag("optuna.pruned_at", str(pruned))
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


# --------------------------------------------------------------------------- running trials


class TrialBudget:
    """Trial slots shared by the worker processes: a trial starts only after claiming one.

    So the workers together start exactly the missing number of trials, never one more (Optuna's
    MaxTrialsCallback alone checks only after a trial, when another worker may already be running
    the last one).
    """

    def __init__(self, shared_count: Any):
        self.shared_count = shared_count  # multiprocessing.Value("i")

    def claim(self) -> bool:
        with self.shared_count.get_lock():
            if self.shared_count.value <= 0:
                return False
            self.shared_count.value -= 1
            return True


def optimize(study: optuna.Study, objective: TrialObjective, budget: TrialBudget, n_trials: int) -> None:
    """Run trials while slots remain and fewer than ``n_trials`` trials are COMPLETE or PRUNED."""
    if not budget.claim():
        return
    enough = MaxTrialsCallback(n_trials, states=DONE_STATES)  # e.g. another machine on the same storage

    def claim_next(study: optuna.Study, _trial: optuna.trial.FrozenTrial) -> None:
        if not budget.claim():
            study.stop()

    study.optimize(objective, catch=(Exception,), callbacks=[enough, claim_next])


@dataclass(frozen=True)
class WorkerJob:
    """All a spawned worker process needs (picklable: paths and ids, no open handles)."""

    cfg: TrainConfig
    dataset_root: str
    tracking_uri: str
    parent_run_id: str
    experiment_id: str
    threads: int


def _limit_threads(threads: int) -> None:
    """Split the cores between worker processes (TensorFlow would give each one all of them)."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(max(1, min(threads, 2)))
    except RuntimeError:  # TensorFlow already initialised in this process: keep its setting
        pass


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Inside: SIGTERM (``kill``, process managers, the parent stopping a worker) acts like Ctrl-C.

    So a terminated study ends its runs KILLED and its trial FAIL instead of leaving them RUNNING.
    Only the main thread can install signal handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def worker_main(job: WorkerJob, worker: int, shared_count: Any) -> None:
    """Entry point of one spawned worker: load the study, run trials until the budget is spent."""
    os.environ.pop("MLFLOW_RUN_ID", None)  # never resume the project run of `mlflow run` as a trial
    os.environ["MLFLOW_TRACKING_URI"] = job.tracking_uri
    mlflow.set_tracking_uri(job.tracking_uri)
    _limit_threads(job.threads)
    with sigterm_as_interrupt():
        _run_worker(job, worker, shared_count)


def _run_worker(job: WorkerJob, worker: int, shared_count: Any) -> None:
    try:
        dataset = open_prepared(job.dataset_root)
        study = open_study(job.cfg, dataset, worker=worker, create=False)
        objective = TrialObjective(job.cfg, dataset, job.parent_run_id, job.experiment_id, verbose=0)
        optimize(study, objective, TrialBudget(shared_count), job.cfg.n_trials)
    except KeyboardInterrupt:
        raise SystemExit(130)  # the trial is FAIL in Optuna and KILLED in MLflow already


def _join_all(workers: list[multiprocessing.process.BaseProcess], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    for proc in workers:
        proc.join(timeout=max(0.0, deadline - time.monotonic()))


def _stop_workers(workers: list[multiprocessing.process.BaseProcess]) -> None:
    """Stop the workers after the parent was interrupted, giving each the chance to end its run.

    A terminal's Ctrl-C reaches the workers too: first let them finish that. Then SIGTERM (which a
    worker treats as Ctrl-C, and which works even where SIGINT is ignored, e.g. a background job),
    and SIGKILL for any still alive; ``close_orphans`` tidies up after those.
    """
    _join_all(workers, 15.0)
    for proc in workers:
        if proc.is_alive():
            proc.terminate()
    _join_all(workers, 45.0)
    for proc in workers:
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=10)


def run_workers(cfg: TrainConfig, dataset: PreparedDataset, parent: mlflow.ActiveRun, n_missing: int) -> list[int]:
    """Run the missing trials in ``min(n_jobs, n_missing)`` spawned processes; returns their exit codes."""
    ctx = multiprocessing.get_context("spawn")  # fork after TensorFlow started is unsafe; threads share one graph
    n_workers = max(1, min(cfg.n_jobs, n_missing))
    shared_count = ctx.Value("i", n_missing)
    job = WorkerJob(
        cfg=cfg,
        dataset_root=str(dataset.root),
        tracking_uri=mlflow.get_tracking_uri(),
        parent_run_id=parent.info.run_id,
        experiment_id=parent.info.experiment_id,
        threads=max(1, (os.cpu_count() or 1) // n_workers),
    )
    workers = [
        ctx.Process(target=worker_main, args=(job, i, shared_count), name=f"cxrexp-trial-worker-{i}")
        for i in range(n_workers)
    ]
    for proc in workers:
        proc.start()
    try:
        for proc in workers:
            proc.join()
    except BaseException:
        _stop_workers(workers)
        raise
    return [int(proc.exitcode or 0) for proc in workers]


def close_orphans(study: optuna.Study, parent_run_id: str) -> int:
    """End child runs (and their Optuna trials) left RUNNING by a worker that died; returns how many.

    Only trials whose run belongs to ``parent_run_id`` are touched: another invocation's live
    trials on the same storage are left alone.
    """
    client = MlflowClient()
    parent = client.get_run(parent_run_id)
    stuck = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'RUNNING'",
    )
    stuck_ids = {run.info.run_id for run in stuck}
    for run in stuck:
        client.set_tag(run.info.run_id, STATE_TAG, "FAIL")
        client.set_terminated(run.info.run_id, "KILLED")
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.user_attrs.get(RUN_ID_ATTR) in stuck_ids:
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    return len(stuck_ids)


# --------------------------------------------------------------------------- study summary


def study_figures(study: optuna.Study, objective: str, seed: int) -> tuple[dict[str, Any], list[str]]:
    """({artifact path: matplotlib Figure}, notes on figures left out). Needs matplotlib only (no plotly)."""
    from optuna.visualization import matplotlib as optuna_plots

    figures: dict[str, Any] = {}
    notes: list[str] = []
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if complete:
            axes = optuna_plots.plot_optimization_history(study, target_name=objective)
            figures["figures/optimization_history.png"] = axes.figure
        else:
            notes.append("optimization history: no COMPLETE trial")
        if len(complete) >= 2:
            try:
                evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
                axes = optuna_plots.plot_param_importances(study, evaluator=evaluator, target_name=objective)
                figures["figures/param_importances.png"] = axes.figure
            except (ValueError, RuntimeError) as err:  # e.g. every parameter took one value
                notes.append(f"parameter importances: {err}")
        else:
            notes.append(f"parameter importances: need at least 2 COMPLETE trials, have {len(complete)}")
    return figures, notes


def log_study_summary(study: optuna.Study, cfg: TrainConfig, image_size: int) -> dict[str, int]:
    """Log the trial table, counts, figures and (when there is one) the best trial to the active run."""
    trials = study.get_trials(deepcopy=False)
    counts = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
    tracking.log_metrics(
        {
            "n_trials_complete": counts["complete"],
            "n_trials_pruned": counts["pruned"],
            "n_trials_failed": counts["fail"],
            "study_epochs_trained": sum(int(t.user_attrs.get(EPOCHS_ATTR, 0)) for t in trials),
        }
    )
    if trials:
        tracking.log_frame(study.trials_dataframe(), "study/trials.csv")
    figures, notes = study_figures(study, cfg.objective, cfg.seed)
    for artifact_file, fig in figures.items():
        tracking.log_figure(fig, artifact_file)
    if notes:
        tracking.log_text("\n".join(notes) + "\n", "study/notes.txt")
    if counts["complete"]:
        best = study.best_trial
        # Replaying the best params through the search space gives the filters they stand for.
        best_cfg = suggest_config(optuna.trial.FixedTrial(best.params, best.number), cfg, image_size)
        best_params = {**best.params, "filters": ",".join(map(str, best_cfg.filters))}
        mlflow.log_params({f"best_{k}": v for k, v in best_params.items()})
        tracking.log_text(
            json.dumps({"trial": best.number, "value": best.value, "params": best_params}, indent=2),
            "study/best_params.json",
        )
        tracking.log_metrics({"best_value": best.value})
    return counts


def best_trained_run(study: optuna.Study) -> tuple[optuna.trial.FrozenTrial, train_step.TrainedRun]:
    """The best COMPLETE trial and what its run left in MLflow; ``StudyFailed`` when there is none."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        states = dict(Counter(t.state.name for t in study.get_trials(deepcopy=False)))
        raise StudyFailed(
            f"study {study.study_name!r} has no COMPLETE trial ({states or 'no trials'}), so there is no model to "
            "register: look at the failed trials' optuna.fail_reason tags, or use --pruner none / more --n-trials"
        )
    best = study.best_trial
    run_id = best.user_attrs.get(RUN_ID_ATTR)
    if not run_id:
        raise StudyFailed(f"best trial {best.number} of study {study.study_name!r} has no {RUN_ID_ATTR} user attr")
    try:
        run = MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException as err:
        raise StudyFailed(
            f"best trial {best.number}'s run {run_id} is not in {mlflow.get_tracking_uri()} ({err.message}): "
            "was the study run against another MLflow store?"
        ) from err
    model_uri = run.data.tags.get(tracking.MODEL_URI_TAG)
    if not model_uri:
        raise StudyFailed(f"best trial {best.number}'s run {run_id} has no {tracking.MODEL_URI_TAG} tag")
    val_metrics = {k: v for k, v in run.data.metrics.items() if k in ("val_roc_auc", "val_pr_auc", "val_sens_at_spec")}
    return best, train_step.TrainedRun(run_id, model_uri, val_metrics, int(best.user_attrs.get(EPOCHS_ATTR, 0)))


def register_best(study: optuna.Study, cfg: TrainConfig, dataset: PreparedDataset) -> tuple[str, str]:
    """Register the best trial's model as ``challenger`` (reusing its version if already registered).

    Returns ``(model_uri, version)``.
    """
    best, trained = best_trained_run(study)
    client = MlflowClient()
    try:
        existing = client.search_model_versions(
            f"name = '{cfg.registered_model_name}' and tags.train_run_id = '{trained.run_id}'"
        )
    except mlflow.exceptions.MlflowException:
        existing = []
    if existing:  # a re-run of a finished study: the same model, no duplicate version
        version = str(max(int(v.version) for v in existing))
        client.set_registered_model_alias(cfg.registered_model_name, registry.CHALLENGER, version)
        print(f"{cfg.registered_model_name} version {version} (trial {best.number}) is @{registry.CHALLENGER} again")
    else:
        version = train_step.register_model(
            trained, cfg, dataset,
            **{
                STUDY_NAME_TAG: study.study_name,
                TRIAL_NUMBER_TAG: best.number,
                "objective": cfg.objective,
                "objective_value": round(float(best.value), 6),
            },
        )
    return trained.model_uri, version


# --------------------------------------------------------------------------- the study


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


__all__ = [
    "DEFAULT_STORAGE",
    "PruningCallback",
    "StudyFailed",
    "StudyMismatch",
    "StorageError",
    "TrialBudget",
    "TrialObjective",
    "base_widths",
    "close_orphans",
    "depth_range",
    "doubling_filters",
    "make_pruner",
    "make_storage",
    "open_study",
    "rdb_url",
    "register_best",
    "run_study",
    "sampler_seed",
    "study_figures",
    "suggest_config",
]
