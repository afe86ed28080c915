"""After the trials: the study's table, counts and figures on the parent run; the best model registered."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from typing import Any

import mlflow
import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from cxrexp.config import TrainConfig
from cxrexp.credentials import redact
from cxrexp.data.store import PreparedDataset
from cxrexp.errors import StudyFailed
from cxrexp.mlflow_edge import registry, tracking, training_run
from cxrexp.tags import (
    BEST_PARAM_TAG_PREFIX,
    CHALLENGER,
    EPOCHS_ATTR,
    MODEL_URI_TAG,
    RUN_ID_ATTR,
    STUDY_NAME_TAG,
    TRIAL_NUMBER_TAG,
)
from cxrexp.tuning.space import suggest_config


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


def log_study_summary(study: optuna.Study, cfg: TrainConfig, image_size: int, run_ids: tuple[str, ...]) -> dict[str, int]:
    """Log the trial table, counts, figures and (when there is one) the best trial to each of ``run_ids``.

    The invocation's own run and the study's parent run (``parent``), when they differ: the parent
    then shows the study as it stands after every machine's trials so far. The best trial's values
    are tags (``optuna.best.<name>``), not params: MLflow never lets a param change, and a later
    invocation may find a better trial.
    """
    trials = study.get_trials(deepcopy=False)
    counts = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
    figures, notes = study_figures(study, cfg.objective, cfg.seed)
    for artifact_file, fig in figures.items():
        tracking.log_figure(fig, artifact_file, run_ids=run_ids)
    metrics = {
        "n_trials_complete": counts["complete"],
        "n_trials_pruned": counts["pruned"],
        "n_trials_failed": counts["fail"],
        "study_epochs_trained": sum(int(t.user_attrs.get(EPOCHS_ATTR, 0)) for t in trials),
    }
    table = study.trials_dataframe() if trials else None
    texts = {"study/notes.txt": "\n".join(notes) + "\n"} if notes else {}
    best_tags: dict[str, str] = {}
    if counts["complete"]:
        best = study.best_trial
        # Replaying the best params through the search space gives the filters they stand for.
        best_cfg = suggest_config(optuna.trial.FixedTrial(best.params, best.number), cfg, image_size)
        best_params = {**best.params, "filters": ",".join(map(str, best_cfg.filters))}
        best_tags = {f"{BEST_PARAM_TAG_PREFIX}{k}": str(v) for k, v in best_params.items()}
        texts["study/best_params.json"] = json.dumps(
            {"trial": best.number, "value": best.value, "params": best_params}, indent=2)
        metrics["best_value"] = best.value
    client = MlflowClient()
    for run_id in run_ids:
        tracking.log_metrics(metrics, run_id=run_id)
        if table is not None:
            tracking.log_frame(table, "study/trials.csv", run_id=run_id)
        for artifact_file, text in texts.items():
            tracking.log_text(text, artifact_file, run_id=run_id)
        for key, value in best_tags.items():
            client.set_tag(run_id, key, value)
    return counts


def best_trained_run(study: optuna.Study) -> tuple[optuna.trial.FrozenTrial, training_run.TrainedRun]:
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
            f"best trial {best.number}'s run {run_id} is not in {redact(mlflow.get_tracking_uri())} ({err.message}): "
            "was the study run against another MLflow store?"
        ) from err
    model_uri = run.data.tags.get(MODEL_URI_TAG)
    if not model_uri:
        raise StudyFailed(f"best trial {best.number}'s run {run_id} has no {MODEL_URI_TAG} tag")
    val_metrics = {k: v for k, v in run.data.metrics.items() if k in ("val_roc_auc", "val_pr_auc", "val_sens_at_spec")}
    return best, training_run.TrainedRun(run_id, model_uri, val_metrics, int(best.user_attrs.get(EPOCHS_ATTR, 0)))


def register_best(study: optuna.Study, cfg: TrainConfig, dataset: PreparedDataset) -> tuple[str, str]:
    """Register the best trial's model exactly once per study and point ``@challenger`` at it, forward only.

    A model already registered (a re-run of a finished study, or the other machine of two that
    finished together) is reused. Two machines registering at the same moment both keep the first
    version and delete the other (``registry.keep_first_version``). ``@challenger`` never moves back
    to an older version (``registry.alias_moves_forward``): re-running an old study leaves a newer
    challenger alone. Returns ``(model_uri, version)``.
    """
    best, trained = best_trained_run(study)
    name = cfg.registered_model_name
    existing = _versions_of(name, trained.run_id)
    if existing:
        version = registry.keep_first_version(name, existing)
    else:
        training_run.register_model(
            trained, cfg, dataset, alias=None,
            **{
                STUDY_NAME_TAG: study.study_name,
                TRIAL_NUMBER_TAG: best.number,
                "objective": cfg.objective,
                "objective_value": round(float(best.value), 6),
            },
        )
        version = registry.keep_first_version(name, _versions_of(name, trained.run_id))
    if registry.point_alias_forward(name, CHALLENGER, version):
        print(f"{name} version {version} (trial {best.number}) is @{CHALLENGER}")
    else:
        print(f"{name} version {version} (trial {best.number}) left as it is: @{CHALLENGER} holds a newer version")
    return trained.model_uri, version


def _versions_of(name: str, train_run_id: str) -> list[str]:
    """The versions of ``name`` registered from the run ``train_run_id``."""
    try:
        found = MlflowClient().search_model_versions(f"name = '{name}' and tags.train_run_id = '{train_run_id}'")
    except mlflow.exceptions.MlflowException:
        return []
    return [str(v.version) for v in found]