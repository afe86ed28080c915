"""The ``promote`` step: judge the challenger against the gates and the champion, move the aliases.

Flow (one MLflow run, tagged ``cxrexp.step=promote``):

1. find ``<name>@challenger`` (and ``<name>@champion``) in the registry;
2. pick the dataset both are judged on: ``--data`` when given, else the challenger's own prepared
   dataset (its ``dataset_digest`` tag and its train run's ``cxrexp.prepared_dir``);
3. for each version, reuse a FINISHED evaluate run on that dataset digest whose ``cxrexp.model_uri``
   is the version (``models:/<name>/<version>``, or the logged model it was registered from) and
   that used the model's own threshold (for the challenger, with ``--external``: one that also scored
   those collections); when there is none, run the evaluate step on ``models:/<name>/<version>``
   (with the challenger's ``--external`` folders) first. The evaluations happen BEFORE the promote run starts, so each
   is its own top-level run, never nested in the promote run;
4. ``promotion.decide`` (pure), then (unless ``dry_run``) ``registry.promote`` and
   ``registry.record_decision``; ``decision.json`` and metrics go to the promote run.

Exit code 0 whether promoted or not: a refusal is a valid answer. 2 when no decision could be made
(no such model, no challenger alias, no dataset to evaluate on, bad gate settings).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from cxrexp.config import EvaluateConfig, PromoteConfig
from cxrexp.data.store import PreparedDataError
from cxrexp.evaluation.external import collection_names
from cxrexp.mlflow_edge import evaluation_run, registry, run_names, tracking
from cxrexp.mlflow_edge.model_uri import version_uri
from cxrexp.promotion import CasePredictions, Decision, Evidence, Gates, decide, external_collections
from cxrexp.tags import (
    AUDIT_PASSED_METRIC,
    AUDIT_TAG,
    CHALLENGER_EVALUATE_RUN_TAG,
    CHALLENGER_VERSION_TAG,
    CHAMPION_EVALUATE_RUN_TAG,
    CHAMPION_VERSION_TAG,
    DECISION_OUTCOME_TAG,
    DIGEST_TAG,
    OCCLUSION_TAG,
    MODEL_URI_TAG,
    PREDICTIONS_ARTIFACT,
    PREPARED_DIR_TAG,
    PREVIOUS_CHAMPION,
    REGISTERED_MODEL_NAME_TAG,
    STEP_TAG,
)

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_CANNOT_DECIDE = 2
class CannotDecide(Exception):
    """Something the user must fix before a decision is possible; the message says what."""


@dataclass(frozen=True)
class Evaluation:
    """One version's evidence and where it came from."""

    version: ModelVersion
    run_id: str
    evidence: Evidence
    evaluated_now: bool


@dataclass(frozen=True)
class _RollbackParams:
    """Logged as the params of a rollback run."""

    registered_model_name: str


def equivalent_uris(name: str, version: ModelVersion) -> set[str]:
    """Model URIs that load exactly this version's artifacts (never an alias: aliases move)."""
    uris = {version_uri(name, version.version)}
    if version.source and version.source.startswith(("models:/m-", "runs:/")):
        uris.add(version.source)  # the logged model it was registered from (e.g. main's evaluate)
    return uris


def _all_experiment_ids(client: MlflowClient) -> list[str]:
    ids: list[str] = []
    token = None
    while True:
        page = client.search_experiments(max_results=1000, page_token=token)
        ids += [e.experiment_id for e in page]
        token = page.token
        if not token:
            return ids


def _used_own_threshold(run: Run) -> bool:
    """Evaluate runs with a threshold override measured another operating point than the served one."""
    value = run.data.params.get("threshold")
    try:
        return value is None or float(value) < 0
    except ValueError:
        return False


def find_evaluation(name: str, version: ModelVersion, digest: str, collections: tuple[str, ...] = ()) -> Run | None:
    """The newest FINISHED evaluate run of this version on dataset ``digest`` (model's own threshold)
    that recorded the occlusion check of every external collection named in ``collections``."""
    client = MlflowClient()
    wanted = equivalent_uris(name, version)
    runs = client.search_runs(
        _all_experiment_ids(client),
        filter_string=(
            f"tags.`{STEP_TAG}` = 'evaluate' and tags.`{DIGEST_TAG}` = '{digest}' "
            "and attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=500,
    )
    for run in runs:
        if (run.data.tags.get(MODEL_URI_TAG) in wanted and _used_own_threshold(run)
                and set(collections) <= set(external_collections(run.data.metrics))):
            return run
    return None


def audit_result(run: Run) -> bool | None:
    """``cxrexp.audit`` tag (passed/failed), else the ``audit_passed`` metric, else None (unknown)."""
    tag = str(run.data.tags.get(AUDIT_TAG, "")).strip().lower()
    if tag in ("passed", "pass", "true", "1"):
        return True
    if tag in ("failed", "fail", "false", "0"):
        return False
    metric = run.data.metrics.get(AUDIT_PASSED_METRIC)
    if metric is None or math.isnan(metric):
        return None
    return metric >= 0.5


def case_predictions(run: Run) -> CasePredictions | None:
    """The evaluate run's per-case test predictions (``predictions.csv``), or None when it has none
    (runs logged before it existed) or the file lacks a column: the champion gate then says it fell
    back to point estimates."""
    frame = tracking.load_frame(run.info.run_id, PREDICTIONS_ARTIFACT)
    if frame is None or not {"source", "label", "probability"} <= set(frame.columns):
        log.warning("evaluate run %s has no usable %s: the champion gate compares point estimates",
                    run.info.run_id, PREDICTIONS_ARTIFACT)
        return None
    threshold = run.data.metrics.get("threshold", 0.5)
    return CasePredictions(tuple(frame["source"].astype(str)), tuple(int(v) for v in frame["label"]),
                           tuple(float(v) for v in frame["probability"]), float(threshold))


def evidence_from_run(version: ModelVersion, run: Run) -> Evidence:
    return Evidence(
        version=str(version.version),
        metrics=dict(run.data.metrics),
        audit_passed=audit_result(run),
        dataset_digest=run.data.tags.get(DIGEST_TAG),
        predictions=case_predictions(run),
        audit_min_lung_focus=_float_param(run, "min_lung_focus"),
        audit_min_lung_focus_lift=_float_param(run, "min_lung_focus_lift"),
        occlusion_note=run.data.tags.get(OCCLUSION_TAG),
        occlusion_margin=_float_param(run, "occlusion_margin"),
    )


def target_dataset(cfg: PromoteConfig, challenger: ModelVersion) -> tuple[str, str | None]:
    """(digest both versions are judged on, prepared folder to evaluate on or None if unknown)."""
    if cfg.data:
        dataset = tracking.resolve_prepared(cfg.data)
        return dataset.digest, str(dataset.root)
    client = MlflowClient()
    tags = challenger.tags or {}
    digest = tags.get("dataset_digest")
    prepared = None
    for run_id in dict.fromkeys(r for r in (tags.get("train_run_id"), challenger.run_id) if r):
        try:
            run_tags = client.get_run(run_id).data.tags
        except mlflow.exceptions.MlflowException:
            continue
        prepared = prepared or run_tags.get(PREPARED_DIR_TAG)
        digest = digest or run_tags.get(DIGEST_TAG)
    if not digest:
        raise CannotDecide(
            f"version {challenger.version} of {challenger.name} records no dataset (no dataset_digest tag, "
            "no train run with one): pass --data <prepared folder or preprocess run id>"
        )
    return digest, prepared


def _run_evaluate(model_uri: str, data: str, external: tuple[str, ...] = ()) -> str:
    scored = f" and the external collections {', '.join(external)}" if external else ""
    print(f"evaluating {model_uri} on {data}{scored} (no evaluate run of them yet)")
    # We are not inside the promote run yet; still, under `mlflow run` MLFLOW_RUN_ID names the promote
    # run and evaluate's start_run would resume it: evaluate must get a run of its own.
    with tracking.outside_project_run():
        return evaluation_run.run(EvaluateConfig(model_uri=model_uri, data=data, external=external))


def ensure_evaluation(name: str, version: ModelVersion, digest: str, data: str | None,
                      external: tuple[str, ...] = ()) -> Evaluation:
    """Evidence for ``version`` on dataset ``digest``: a finished evaluate run that also scored the
    ``external`` collection folders (matched by ``collection_names``), or a new one of them all."""
    collections = tuple(collection_names(external))
    names = ", ".join(collections)
    found = find_evaluation(name, version, digest, collections)
    if found is not None:
        return Evaluation(version, found.info.run_id, evidence_from_run(version, found), evaluated_now=False)
    uri = version_uri(name, version.version)
    if not data:
        also = f" that scored the external collections {names}" if external else ""
        raise CannotDecide(
            f"no evaluate run of {uri} on dataset {digest}{also}, and the folder of that dataset is unknown: "
            "pass --data <prepared folder or preprocess run id>"
        )
    missing = [folder for folder in external if not Path(folder).expanduser().is_dir()]
    if missing:  # before evaluate loads anything: a typo in a folder is the likely cause
        raise CannotDecide(
            f"no evaluate run of {uri} on dataset {digest} scored the external collections "
            f"{names}, and --external {', '.join(missing)} is not a folder "
            "(give collections with class folders, e.g. COVID/ and Normal/)"
        )
    run_id = _run_evaluate(uri, data, external)
    run = MlflowClient().get_run(run_id)
    recorded = run.data.tags.get(DIGEST_TAG)
    if recorded != digest:
        raise CannotDecide(
            f"evaluate run {run_id} of {uri} recorded dataset {recorded!r}, not {digest!r} as asked; "
            "pass --data explicitly"
        )
    return Evaluation(version, run_id, evidence_from_run(version, run), evaluated_now=True)


def _float_param(run: Run, name: str) -> float | None:
    """The evaluate run's param ``name`` as a float (NaN when unreadable), or None when it was not recorded."""
    return _as_float(run.data.params[name]) if name in run.data.params else None


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _log_decision(cfg: PromoteConfig, decision: Decision, challenger: Evaluation, champion: Evaluation | None,
                  digest: str, moved: list[str]) -> None:
    mlflow.set_tags(
        {
            REGISTERED_MODEL_NAME_TAG: cfg.registered_model_name,
            CHALLENGER_VERSION_TAG: str(challenger.version.version),
            CHALLENGER_EVALUATE_RUN_TAG: challenger.run_id,
            CHAMPION_VERSION_TAG: str(champion.version.version) if champion else "",
            CHAMPION_EVALUATE_RUN_TAG: champion.run_id if champion else "",
            DIGEST_TAG: digest,
            DECISION_OUTCOME_TAG: _outcome(decision, cfg.dry_run),
        }
    )
    metrics: dict[str, float] = {"promoted": float(decision.promote and not cfg.dry_run),
                                 "passed_all_gates": float(decision.promote)}
    for check in decision.checks:
        metrics[f"gate_{check.gate}_passed"] = float(check.passed)
    metrics[f"challenger_{cfg.primary_metric}"] = _as_float(challenger.evidence.metrics.get(cfg.primary_metric))
    for key, value in decision.gate_values.get("champion", {}).items():
        if key.startswith("difference") and value is not None:
            metrics[f"champion_gate_{key}"] = _as_float(value)
    if champion is not None:
        metrics[f"champion_{cfg.primary_metric}"] = _as_float(champion.evidence.metrics.get(cfg.primary_metric))
    tracking.log_metrics(metrics)
    payload = {
        **decision.to_dict(),
        "outcome": _outcome(decision, cfg.dry_run),
        "registered_model_name": cfg.registered_model_name,
        "dataset_digest": digest,
        "challenger": {"version": str(challenger.version.version), "evaluate_run": challenger.run_id,
                       "evaluated_now": challenger.evaluated_now},
        "champion": None if champion is None else {
            "version": str(champion.version.version), "evaluate_run": champion.run_id,
            "evaluated_now": champion.evaluated_now},
        "settings": asdict(Gates.from_config(cfg)),
        "dry_run": cfg.dry_run,
        "alias_moves": moved,
    }
    mlflow.log_dict(json.loads(json.dumps(payload, default=str)), "decision.json")


def _outcome(decision: Decision, dry_run: bool) -> str:
    if dry_run:
        return "would-promote" if decision.promote else "would-refuse"
    return "promoted" if decision.promote else "refused"


def report(cfg: PromoteConfig, decision: Decision, challenger: Evaluation, champion: Evaluation | None,
           digest: str, moved: list[str]) -> str:
    name = cfg.registered_model_name
    against = f"champion version {champion.version.version}" if champion else "no champion"
    lines = [f"promote {name}: challenger version {challenger.version.version} vs {against}, on dataset {digest}"]
    for evaluation, who in ((challenger, "challenger"), (champion, "champion")):
        if evaluation is not None:
            how = "evaluated now" if evaluation.evaluated_now else "existing evaluation"
            lines.append(f"  {who} evidence: evaluate run {evaluation.run_id} ({how})")
    lines += [f"  {reason}" for reason in decision.reasons]
    version = challenger.version.version
    if cfg.dry_run:
        verdict = (f"DRY RUN: version {version} passes every gate and WOULD be promoted; nothing was moved"
                   if decision.promote else
                   f"DRY RUN: version {version} would NOT be promoted (failed: {', '.join(decision.failed_gates)}); "
                   "nothing was moved")
    elif decision.promote:
        verdict = f"PROMOTED: version {version} is now {name}@{cfg.champion_alias}"
    else:
        keeps = f"@{cfg.champion_alias} stays version {champion.version.version}" if champion else \
            f"there is still no @{cfg.champion_alias}"
        verdict = (f"NOT PROMOTED: version {version} failed {len(decision.failed_gates)} gate(s) "
                   f"({', '.join(decision.failed_gates)}); {keeps}")
    lines.append(verdict)
    lines += [f"  {line}" for line in moved]
    return "\n".join(lines)


def _fail(message: str, command: str = "promote") -> int:
    print(f"cxrexp {command}: {message}", file=sys.stderr)
    return EXIT_CANNOT_DECIDE


def run(cfg: PromoteConfig) -> int:
    """Decide on ``<name>@<challenger_alias>``; returns the exit code (0 decided, 2 could not decide)."""
    if cfg.rollback:
        return rollback(cfg.registered_model_name)
    name = cfg.registered_model_name
    try:
        gates = Gates.from_config(cfg)
    except ValueError as err:
        return _fail(f"bad gate settings: {err}")
    try:
        challenger_version = registry.get_alias_version(name, cfg.challenger_alias)
        if challenger_version is None:
            raise CannotDecide(
                f"{name} has no @{cfg.challenger_alias} alias (its aliases: {registry.describe_aliases(name)}); "
                "train a model (`cxrexp train`) or pass --challenger-alias"
            )
        champion_version = registry.get_alias_version(name, cfg.champion_alias)
        if champion_version is not None and str(champion_version.version) == str(challenger_version.version):
            print(f"{name} version {challenger_version.version} already is @{cfg.champion_alias}: nothing to decide")
            return EXIT_OK
        digest, data = target_dataset(cfg, challenger_version)
        # Evaluations first, outside any run: each evaluate run stays a top-level run of its own.
        challenger = ensure_evaluation(name, challenger_version, digest, data, cfg.external)
        champion = ensure_evaluation(name, champion_version, digest, data) if champion_version else None
    except (CannotDecide, registry.RegistryError, PreparedDataError) as err:
        return _fail(f"cannot decide: {err}")

    decision = decide(challenger.evidence, champion.evidence if champion else None, gates)
    with tracking.step_run("promote", cfg, run_name=run_names.promote_name(cfg)) as active:
        moved: list[str] = []
        if decision.promote and not cfg.dry_run:
            try:
                move = registry.promote(
                    name, str(challenger_version.version),
                    champion_alias=cfg.champion_alias,
                    previous_alias=PREVIOUS_CHAMPION,
                    challenger_alias=cfg.challenger_alias,
                    expected_champion=champion_version.version if champion_version else None,
                )
            except registry.AliasMoved as err:
                mlflow.set_tags({DECISION_OUTCOME_TAG: "refused-alias-moved", REGISTERED_MODEL_NAME_TAG: name})
                mlflow.log_dict({"outcome": "refused-alias-moved", "reason": str(err)}, "decision.json")
                return _fail(f"refused: {err}")
            moved = move.describe()
        if not cfg.dry_run:  # a dry run changes nothing in the registry, tags included
            registry.record_decision(
                name, str(challenger_version.version), decision,
                extra_tags={
                    "run_id": active.info.run_id,
                    "dataset_digest": digest,
                    "champion_version": champion_version.version if champion_version else "",
                },
            )
        _log_decision(cfg, decision, challenger, champion, digest, moved)
        print(report(cfg, decision, challenger, champion, digest, moved))
    return EXIT_OK


def rollback(name: str) -> int:
    """Restore ``<name>@previous-champion`` as champion; 0 when something moved, 2 when nothing could."""
    try:
        before = registry.aliases(name)
        if PREVIOUS_CHAMPION not in before:
            raise registry.NothingToRollBack(
                f"{name} has no @{PREVIOUS_CHAMPION} alias: nothing to roll back to "
                f"(aliases: {registry.describe_aliases(name)})"
            )
    except registry.RegistryError as err:
        return _fail(str(err), "rollback")
    with tracking.step_run("rollback", _RollbackParams(name)):
        try:
            move = registry.rollback(name)
        except registry.NothingToRollBack as err:
            mlflow.set_tag(DECISION_OUTCOME_TAG, "nothing-to-roll-back")
            return _fail(str(err), "rollback")
        mlflow.set_tags({REGISTERED_MODEL_NAME_TAG: name, DECISION_OUTCOME_TAG: "rolled-back"})
        mlflow.log_dict({"registered_model_name": name, "moves": [list(m) for m in move.moves]}, "rollback.json")
        print(f"rolled back {name}:")
        for line in move.describe():
            print(f"  {line}")
    return EXIT_OK
