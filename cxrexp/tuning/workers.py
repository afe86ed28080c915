"""Running trials: a shared trial budget, spawned worker processes, and tidying up after them.

One process or several, trials run through ``optimize``; the budget makes the workers start exactly
the missing number of trials between them. SIGTERM acts as Ctrl-C so an interrupted trial's run
ends KILLED rather than staying RUNNING; ``close_orphans`` ends what a killed worker left behind, and
``wait_for_trials_elsewhere`` keeps an invocation alive while other machines' trials hold the study's
last places, so that one of them dying is retried.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import mlflow
import optuna
from mlflow.tracking import MlflowClient
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState

from cxrexp.config import TrainConfig
from cxrexp.data.store import PreparedDataset, open_prepared
from cxrexp.mlflow_edge.signals import sigterm_as_interrupt
from cxrexp.tags import HEARTBEAT_ATTR, INVOCATION_TAG, RUN_ID_ATTR, STATE_TAG
from cxrexp.tf_logs import load_tensorflow
from cxrexp.tuning.stale import fail_stale, retry
from cxrexp.tuning.storage import DONE_STATES, open_study
from cxrexp.tuning.trial import TrialObjective

log = logging.getLogger(__name__)


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
    invocation_run_id: str
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


def worker_main(job: WorkerJob, shared_count: Any) -> None:
    """Entry point of one spawned worker: load the study, run trials until the budget is spent."""
    os.environ.pop("MLFLOW_RUN_ID", None)  # never resume the project run of `mlflow run` as a trial
    os.environ["MLFLOW_TRACKING_URI"] = job.tracking_uri
    mlflow.set_tracking_uri(job.tracking_uri)
    load_tensorflow()  # a spawned process: TensorFlow's start-up lines again, once per worker
    _limit_threads(job.threads)
    with sigterm_as_interrupt():
        _run_worker(job, shared_count)


def _run_worker(job: WorkerJob, shared_count: Any) -> None:
    try:
        dataset = open_prepared(job.dataset_root)
        study = open_study(job.cfg, dataset, create=False)
        objective = TrialObjective(job.cfg, dataset, job.parent_run_id, job.invocation_run_id, job.experiment_id,
                                   verbose=0)
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


def run_workers(cfg: TrainConfig, dataset: PreparedDataset, parent_run_id: str, invocation_run_id: str,
                experiment_id: str, n_missing: int) -> list[int]:
    """Run the missing trials in ``min(n_jobs, n_missing)`` spawned processes; returns their exit codes."""
    ctx = multiprocessing.get_context("spawn")  # fork after TensorFlow started is unsafe; threads share one graph
    n_workers = max(1, min(cfg.n_jobs, n_missing))
    shared_count = ctx.Value("i", n_missing)
    job = WorkerJob(
        cfg=cfg,
        dataset_root=str(dataset.root),
        tracking_uri=mlflow.get_tracking_uri(),
        parent_run_id=parent_run_id,
        invocation_run_id=invocation_run_id,
        experiment_id=experiment_id,
        threads=max(1, (os.cpu_count() or 1) // n_workers),
    )
    workers = [
        ctx.Process(target=worker_main, args=(job, shared_count), name=f"cxrexp-trial-worker-{i}")
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


def close_orphans(study: optuna.Study, invocation_run_id: str, experiment_id: str) -> int:
    """End child runs (and their Optuna trials) left RUNNING by a worker that died; returns how many.

    Only this invocation's trials (tag ``optuna.invocation_run_id``) are touched: other machines'
    live trials under the same parent run are left alone (a dead one there is the heartbeat's:
    ``stale``). The failed trials' parameters are queued again, as ``stale.RetryStaleTrial`` does.
    """
    client = MlflowClient()
    stuck = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{INVOCATION_TAG}` = '{invocation_run_id}' and attributes.status = 'RUNNING'",
    )
    stuck_ids = {run.info.run_id for run in stuck}
    for run in stuck:
        client.set_tag(run.info.run_id, STATE_TAG, "FAIL")
        client.set_terminated(run.info.run_id, "KILLED")
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.user_attrs.get(RUN_ID_ATTR) in stuck_ids:
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            retry(study, trial)  # as the heartbeat would: the same parameters run again next time
    return len(stuck_ids)


def wait_for_trials_elsewhere(study: optuna.Study, n_trials: int, poll_s: float,
                              sleep: Callable[[float], None] = time.sleep) -> bool:
    """Wait while other processes' trials hold the study's last places; True when one died and was requeued.

    Why: ``n_trials`` counts every machine, so an invocation whose remaining places are all held by
    trials RUNNING elsewhere has nothing to start. Were it to end there and the other machine then
    die, nobody would be left to notice: the study would stay short of ``n_trials`` until someone
    ran it again. So it waits, failing stale trials every ``poll_s`` seconds; when a dead trial's
    retry is queued (WAITING) it returns True and the caller runs it. It returns False once the
    study has ``n_trials`` done trials, or nothing is running or queued any more (the other
    machines ended; their failures are not retried here, as a re-run would) or the trials still
    running have no heartbeat.
    """
    told = False
    while True:
        fail_stale(study)
        trials = study.get_trials(deepcopy=False)
        if sum(t.state in DONE_STATES for t in trials) >= n_trials:
            return False
        if any(t.state == TrialState.WAITING for t in trials):
            return True
        # Only trials that beat: one without a heartbeat (another invocation's with heartbeat=0, a hand-made
        # study.ask()) can never be found dead, so waiting for it could last for ever.
        running = [t.number for t in trials if t.state == TrialState.RUNNING and t.user_attrs.get(HEARTBEAT_ATTR)]
        if not running:
            return False
        if not told:
            log.warning("study %r: trials %s are running in other processes and hold its last places; waiting for "
                        "them (one whose heartbeat stops is failed and run again here)", study.study_name, running)
            told = True
        sleep(poll_s)
