"""The ``evaluate`` step: one MLflow run that judges a logged model on a prepared test split.

What it logs (the contract the promote step and readers rely on):

- metrics ``test_<name>`` for every name of ``metrics.evaluate_predictions`` (counts, rates with
  ``_ci_low``/``_ci_high``, ``roc_auc``, ``pr_auc``, ``brier``, ``ppv/npv_at_prevalence`` when a
  prevalence is given), plus ``test_n`` and ``threshold`` (the one used);
- ``metric_notes.json`` (metric -> why it is NaN) and a tag ``cxrexp.note.<metric>`` per undefined
  point estimate;
- ``predictions.csv`` (source, class_name, label, probability, predicted, cell) for the test split;
- ``figures/``: confusion matrix, ROC with the operating point, PR, calibration, threshold sweep,
  Grad-CAM gallery, lung-focus distribution;
- ``gradcam/<cell>_<n>_overlay.png`` and ``_contour.png`` for a fixed seeded sample per confusion
  cell, with ``gradcam/samples.csv``;
- shortcut audit: metrics ``audit_lung_focus_mean``, ``audit_lung_focus_median``,
  ``audit_border_share_mean``, ``audit_n``, ``audit_passed`` (1/0), tags ``cxrexp.audit``
  (``passed``/``failed``) and ``cxrexp.audit_reason``, ``audit/scores.csv``;
- ``report.html``: the self-contained model card (``cxrexp.report``);
- tags ``cxrexp.model_uri``, ``cxrexp.model_id``, ``cxrexp.registered_model``,
  ``cxrexp.model_version``, ``cxrexp.train_run_id``, ``cxrexp.dataset_digest`` (the test data),
  ``cxrexp.training_dataset_digest``, and the test split as an ``mlflow.data`` input (context
  ``test``).

Every check that can fail on user input (model URI, dataset, image settings, empty test split)
runs before the MLflow run starts, so a mistake costs no run and no compute.

The pure parts (image-setting comparison, confusion cells, the seeded sampling of Grad-CAM cases
and the shortcut audit) live in ``cxrexp/audit.py``; this module resolves, runs and logs.
"""

from __future__ import annotations

import io
import logging
import math
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cxrexp import metrics, plots, report, tracking
from cxrexp.audit import (
    AUDIT_SAMPLE,
    CAM_METHOD,
    CELLS,
    SALIENT_LEVEL,
    AuditOutcome,
    confusion_cells,
    display_pair,
    pick_per_cell,
    sample_order,
    shortcut_audit,
    spec_mismatches,
)
from cxrexp.config import EvaluateConfig, ImageSpec
from cxrexp.store import PreparedDataError, PreparedDataset, open_prepared

log = logging.getLogger(__name__)

AUDIT_TAG = "cxrexp.audit"
AUDIT_REASON_TAG = "cxrexp.audit_reason"
TRAIN_RUN_TAG = "cxrexp.train_run_id"
MODEL_ID_TAG = "cxrexp.model_id"
MODEL_VERSION_TAG = "cxrexp.model_version"
REGISTERED_MODEL_TAG = "cxrexp.registered_model"
TRAINING_DIGEST_TAG = "cxrexp.training_dataset_digest"
NOTE_TAG_PREFIX = "cxrexp.note."
MLFLOW_EVALUATE_TAG = "cxrexp.mlflow_evaluate"

# --------------------------------------------------------------------------------------------------
# What the model URI points at


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from, as far as the tracking store knows ("" when unknown)."""

    model_uri: str
    model_id: str = ""
    source_run_id: str = ""
    train_run_id: str = ""
    dataset_digest: str = ""
    registered_name: str = ""
    version: str = ""

    def run_name(self) -> str:
        if self.registered_name:
            return f"evaluate-{self.registered_name}" + (f"-v{self.version}" if self.version else "")
        if self.train_run_id or self.source_run_id:
            return f"evaluate-run-{(self.train_run_id or self.source_run_id)[:8]}"
        return f"evaluate-{self.model_id or 'model'}"


def _registered_version(model_uri: str) -> tuple[str, str]:
    """``models:/name@alias`` or ``models:/name/3`` -> (name, version); ("", "") otherwise."""
    if not model_uri.startswith("models:/"):
        return "", ""
    rest = model_uri[len("models:/") :].strip("/")
    if rest.startswith("m-") and "/" not in rest and "@" not in rest:
        return "", ""  # a logged-model id, not a registered name
    client = MlflowClient()
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            return name, str(client.get_model_version_by_alias(name, alias).version)
        name, _, version = rest.partition("/")
        if version.isdigit():
            return name, version
        if version in ("latest", ""):
            versions = client.search_model_versions(f"name='{name}'", max_results=1, order_by=["version_number DESC"])
            return name, str(versions[0].version) if versions else ""
    except MlflowException as err:
        log.debug("could not resolve the registered version of %s: %s", model_uri, err)
    return "", ""


def describe_model(model_uri: str) -> ModelSource:
    """What the tracking store knows about ``model_uri``: ids, training run and data digest."""
    try:
        info = mlflow.models.get_model_info(model_uri)
    except (MlflowException, OSError) as err:
        log.warning("no model metadata for %s (%s)", model_uri, err)
        return ModelSource(model_uri=model_uri)
    serving_meta = (info.metadata or {}).get("cxrexp_serving", {}) or {}
    name, version = _registered_version(model_uri)
    source_run = info.run_id or ""
    return ModelSource(
        model_uri=model_uri,
        model_id=str(getattr(info, "model_id", "") or ""),
        source_run_id=source_run,
        train_run_id=str(serving_meta.get("train_run_id") or source_run),
        dataset_digest=str(serving_meta.get("dataset_digest") or ""),
        registered_name=name,
        version=version,
    )


# --------------------------------------------------------------------------------------------------
# Checks before any work


def check_config(cfg: EvaluateConfig) -> None:
    """Raise ``UserError`` naming the flag for settings that cannot work."""
    from cxrexp.cli import UserError

    problems = []
    if cfg.threshold > 1:
        problems.append(f"--threshold {cfg.threshold} must be in [0, 1] (or negative for the model's own)")
    if cfg.prevalence > 1:
        problems.append(f"--prevalence {cfg.prevalence} must be in [0, 1] (or negative for none)")
    if cfg.n_bootstrap < 0:
        problems.append(f"--n-bootstrap {cfg.n_bootstrap} must be >= 0 (0 disables the intervals)")
    if cfg.gradcam_per_cell < 0:
        problems.append(f"--gradcam-per-cell {cfg.gradcam_per_cell} must be >= 0")
    if not 0 <= cfg.min_lung_focus <= 1:
        problems.append(f"--min-lung-focus {cfg.min_lung_focus} must be in [0, 1]")
    if cfg.batch_size < 1:
        problems.append(f"--batch-size {cfg.batch_size} must be >= 1")
    if not cfg.model_uri.strip():
        problems.append("--model-uri is empty: give models:/<name>@<alias>, models:/<name>/<version>, "
                        "models:/m-<id> or runs:/<run_id>/model")
    if problems:
        raise UserError("; ".join(problems))


def training_dataset(source: ModelSource) -> PreparedDataset:
    """The prepared dataset the model was trained on, found through its training run's tag."""
    if not source.train_run_id:
        raise PreparedDataError(
            f"{source.model_uri} carries no training run id, so its dataset is unknown: pass --data "
            "(a prepared dataset folder or a preprocess run id)"
        )
    try:
        run = MlflowClient().get_run(source.train_run_id)
    except MlflowException as err:
        raise PreparedDataError(
            f"the training run {source.train_run_id} of {source.model_uri} is not in {mlflow.get_tracking_uri()} "
            f"({err.message}): pass --data"
        ) from err
    prepared = run.data.tags.get(tracking.PREPARED_DIR_TAG)
    if not prepared:
        raise PreparedDataError(
            f"the training run {source.train_run_id} of {source.model_uri} has no {tracking.PREPARED_DIR_TAG} tag: "
            "pass --data"
        )
    try:
        dataset = open_prepared(prepared)
    except PreparedDataError as err:
        raise PreparedDataError(
            f"{source.model_uri} was trained on the prepared dataset {prepared} (digest "
            f"{source.dataset_digest or 'unknown'}), which cannot be opened: {err}. Prepare it again "
            "with the same settings or pass --data"
        ) from err
    if source.dataset_digest and dataset.digest != source.dataset_digest:
        raise PreparedDataError(
            f"{source.model_uri} was trained on dataset {source.dataset_digest}, but {prepared} now holds "
            f"{dataset.digest} (prepared again with other data or settings): pass --data explicitly"
        )
    return dataset


def resolve_data(data: str, source: ModelSource) -> tuple[PreparedDataset, PreparedDataset | None]:
    """(dataset to evaluate on, the training dataset when it can be found)."""
    if not data:
        dataset = training_dataset(source)
        return dataset, dataset
    dataset = tracking.resolve_prepared(data)
    try:
        trained_on = training_dataset(source)
    except PreparedDataError as err:
        log.info("training dataset of %s not available for the overlap check: %s", source.model_uri, err)
        trained_on = None
    return dataset, trained_on


def check_spec(model_uri: str, model_spec: ImageSpec, dataset: PreparedDataset) -> None:
    mismatches = spec_mismatches(model_spec, dataset.spec)
    if mismatches:
        raise PreparedDataError(
            f"{model_uri} was trained on images prepared as {model_spec}, but {dataset.root} was prepared as "
            f"{dataset.spec} ({'; '.join(mismatches)}): the model would see different pixels. Evaluate on data "
            f"prepared with the model's settings (cxrexp preprocess --image-size {model_spec.image_size} "
            f"--enhance {model_spec.enhance} ...) or leave --data empty to use the model's own dataset"
        )


def evaluation_frame(dataset: PreparedDataset) -> pd.DataFrame:
    """The test split sorted by ``source`` (a stable order for sampling); error when it is empty."""
    frame = dataset.split_frame("test")
    if frame.empty:
        counts = dataset.manifest["split"].value_counts().to_dict()
        raise PreparedDataError(
            f"the test split of {dataset.root} is empty (splits: {counts}): nothing to evaluate; prepare the "
            "data again with a larger test_frac or more images"
        )
    return frame.sort_values("source", kind="stable").reset_index(drop=True)


def training_overlap(test: pd.DataFrame, trained_on: PreparedDataset | None, digest: str) -> int | None:
    """Test images whose content hash is in the training dataset's train/val splits (None: unknown)."""
    if trained_on is None:
        return None
    if trained_on.digest == digest:
        return 0  # the split is duplicate-aware: a held-out test split shares no content with train/val
    seen = set(trained_on.manifest.loc[trained_on.manifest["split"].isin(["train", "val"]), "sha256"])
    return int(test["sha256"].isin(seen).sum())


# --------------------------------------------------------------------------------------------------
# Logging helpers


class _Staging:
    """A temp folder for files that are both logged and embedded in the report."""

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="cxrexp-evaluate-")
        self.root = Path(self._tmp.name)

    def close(self) -> None:
        self._tmp.cleanup()

    def figure(self, fig: Any, artifact_file: str, dpi: int = 100) -> bytes:
        """Render ``fig`` to PNG, log it as ``artifact_file`` and return the PNG bytes."""
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi)
        png = buffer.getvalue()
        path = self.root / artifact_file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
        parent = str(Path(artifact_file).parent)
        mlflow.log_artifact(str(path), artifact_path=None if parent == "." else parent)
        return png


def _finite(value: float) -> bool:
    return value is not None and math.isfinite(value)


def _note_tags(reasons: dict[str, str]) -> dict[str, str]:
    """One tag per undefined point metric (the CI reasons are in metric_notes.json)."""
    return {
        f"{NOTE_TAG_PREFIX}test_{name}": reason[:500]
        for name, reason in reasons.items()
        if not name.endswith(("_ci_low", "_ci_high"))
    }


def mlflow_cross_check(predictions: pd.DataFrame, counts: metrics.Confusion) -> str:
    """Run MLflow's default classifier evaluator on the predictions table as an independent check.

    Logs ``mlflow_test_*`` metrics and MLflow's confusion-matrix plot; returns a short status for
    the ``cxrexp.mlflow_evaluate`` tag. Never raises: it is an extra, not the source of the metrics.
    Skipped with one class, where MLflow reports undefined rates as 0.0 (scikit-learn's
    ``zero_division``) instead of NaN with a reason.
    """
    labels = predictions["label"].to_numpy()
    if labels.size == 0 or labels.min() == labels.max():
        return "skipped: one class only (MLflow's evaluator would report undefined rates as 0.0)"
    frame = predictions[["label", "predicted"]].astype(np.int64)
    evaluation_logger = logging.getLogger("mlflow.models.evaluation")
    saved_level = evaluation_logger.level
    try:
        # Its "the model type looks like None" hint misfires on a static predictions table.
        evaluation_logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pandas/sklearn deprecation chatter from inside MLflow
            data = mlflow.data.from_pandas(frame, targets="label", predictions="predicted", name="test-predictions")
            result = mlflow.models.evaluate(
                data=data,
                model_type="classifier",
                evaluator_config={"pos_label": 1, "log_model_explainability": False, "metric_prefix": "mlflow_test_"},
            )
    except Exception as err:  # noqa: BLE001 - the extra must never cost the user the evaluation
        log.warning("mlflow.models.evaluate failed (our own metrics are unaffected): %s", err)
        return f"failed: {type(err).__name__}: {str(err)[:200]}"
    finally:
        evaluation_logger.setLevel(saved_level)
    theirs = {k: int(result.metrics.get(f"mlflow_test_{v}", -1)) for k, v in (
        ("tp", "true_positives"), ("fp", "false_positives"), ("tn", "true_negatives"), ("fn", "false_negatives"))}
    ours = {"tp": counts.tp, "fp": counts.fp, "tn": counts.tn, "fn": counts.fn}
    if theirs != ours:
        log.warning("MLflow's confusion counts %s differ from cxrexp's %s", theirs, ours)
        return f"counts differ: mlflow {theirs}, cxrexp {ours}"
    return "ok: confusion counts agree"


# --------------------------------------------------------------------------------------------------
# The step


def _log_audit(stage: _Staging, outcome: AuditOutcome, positions: np.ndarray, test: pd.DataFrame,
               probabilities: np.ndarray, cells: np.ndarray, min_lung_focus: float) -> None:
    scores = pd.DataFrame(
        {
            "source": test["source"].to_numpy()[positions],
            "label": test["label"].to_numpy()[positions],
            "probability": probabilities[positions],
            "cell": cells[positions],
            "gated": outcome.gated,
            "lung_focus": [s["lung_focus"] for s in outcome.scores],
            "border_share": [s["border_share"] for s in outcome.scores],
            "note": [s["reason"] for s in outcome.scores],
        }
    )
    tracking.log_frame(scores, "audit/scores.csv")
    gated_focus = scores.loc[scores["gated"], "lung_focus"].to_numpy()
    stage.figure(plots.lung_focus_figure(gated_focus, min_lung_focus), "figures/lung_focus.png")


def _log_gallery(stage: _Staging, model: Any, dataset: PreparedDataset, test: pd.DataFrame,
                 probabilities: np.ndarray, cells: np.ndarray, cfg: EvaluateConfig) -> bytes:
    """Per confusion cell, overlay and contour side by side on the stored (enhanced) image."""
    from cxrexp import gradcam

    picks = pick_per_cell(cells, sample_order(len(test), cfg.seed), cfg.gradcam_per_cell)
    chosen = [(cell, n, int(position)) for cell in CELLS for n, position in enumerate(picks[cell], start=1)]
    images = dataset.images()
    pixels = [np.asarray(images[int(test.at[position, "row"])]) for _, _, position in chosen]
    heatmaps = gradcam.gradcam(model, np.stack(pixels).astype(np.float32)[..., None] / 255.0,
                               batch_size=cfg.batch_size, method=CAM_METHOD) if chosen else []
    items: list[tuple[str, np.ndarray]] = []
    listed = []
    for (cell, n, position), image, heat in zip(chosen, pixels, heatmaps):
        image, heat = display_pair(image, heat)
        coloured = gradcam.overlay(image, heat)
        contoured = gradcam.contour_overlay(image, heat)
        mlflow.log_image(coloured, f"gradcam/{cell}_{n}_overlay.png")
        mlflow.log_image(contoured, f"gradcam/{cell}_{n}_contour.png")
        probability = float(probabilities[position])
        items.append((f"{cell} {n}: p={probability:.2f}", coloured))
        items.append((f"{cell} {n}: contours 0.5/0.75", contoured))
        listed.append({"cell": cell, "n": n, "source": test.at[position, "source"],
                       "label": int(test.at[position, "label"]), "probability": probability})
    tracking.log_frame(pd.DataFrame(listed, columns=["cell", "n", "source", "label", "probability"]),
                       "gradcam/samples.csv")
    return stage.figure(plots.gradcam_gallery(items, ncols=max(2, min(8, 2 * cfg.gradcam_per_cell))),
                        "figures/gradcam_gallery.png", dpi=80)


def _log_test_metrics(evaluation: metrics.Evaluation, n_test: int, threshold: float, overlap: int | None,
                      model_id: str, test_data: Any) -> None:
    # Linked to the evaluated LoggedModel and the test split too, so the model's page in the MLflow UI
    # (Models tab of the experiment) shows its test figures next to the training run's.
    tracking.log_metrics(evaluation.metrics, prefix="test_", model_id=model_id, dataset=test_data)
    tracking.log_metrics({"test_n": n_test, "threshold": threshold})
    if overlap is not None:
        tracking.log_metrics({"test_overlap_with_training": overlap})
    notes = {f"test_{name}": reason for name, reason in sorted(evaluation.reasons.items())}
    mlflow.log_dict(notes, "metric_notes.json")  # {} when every metric is defined
    if notes:
        mlflow.set_tags(_note_tags(evaluation.reasons))


def _log_figures(stage: _Staging, labels: np.ndarray, probabilities: np.ndarray, threshold: float,
                 counts: metrics.Confusion, evaluation: metrics.Evaluation,
                 dataset: PreparedDataset) -> list[report.Figure]:
    """The five classification figures, logged under figures/ and returned for the report."""
    roc_ci = (evaluation.metrics["roc_auc_ci_low"], evaluation.metrics["roc_auc_ci_high"])
    sweep = metrics.threshold_sweep(labels, probabilities, np.linspace(0.0, 1.0, 101))
    tracking.log_frame(sweep, "threshold_sweep.csv")
    class_names = (dataset.negative_label, dataset.positive_class)
    drawn = [
        ("Confusion matrix", "confusion_matrix", plots.confusion_matrix_figure(counts, class_names, threshold),
         "rows: true class, columns: prediction at the operating threshold"),
        ("ROC curve", "roc", plots.roc_figure(labels, probabilities, threshold,
                                              roc_ci if all(map(_finite, roc_ci)) else None),
         "the dot is the operating point"),
        ("Precision-recall curve", "pr", plots.pr_figure(labels, probabilities, threshold),
         "dashed: the test split's prevalence (a chance-level classifier)"),
        ("Calibration", "calibration", plots.calibration_figure(labels, probabilities),
         "observed positive fraction per probability bin"),
        ("Threshold sweep", "threshold_sweep", plots.threshold_sweep_figure(sweep, threshold),
         "how the rates trade off as the threshold moves"),
    ]
    return [report.Figure(title, stage.figure(fig, f"figures/{name}.png"), caption)
            for title, name, fig, caption in drawn]


def gradcam_unavailable(model: Any) -> str:
    """Why Grad-CAM cannot explain ``model`` ("" when it can): it needs a conv layer and a ``logit`` layer."""
    from cxrexp import gradcam

    try:
        gradcam.last_conv_layer_name(model)
        model.get_layer(gradcam.LOGIT_LAYER)
    except ValueError as err:
        return f"Grad-CAM unavailable for this model: {err}"
    return ""


def _audit_method_text(tolerance_px: int, positive_label: str) -> str:
    return (
        f"HiResCAM heatmaps (the Grad-CAM variant faithful to this network's dense head) of up to {AUDIT_SAMPLE} "
        f"seeded test cases the model calls {positive_label}. Lung focus is the share of each heatmap's salient "
        f"mass (values >= {SALIENT_LEVEL:g} of its peak) inside the lung mask (a dataset mask is widened by "
        f"{tolerance_px} px, one cell of the explained feature map; the geometric prior is used as it is); the "
        "mean is gated. A model that reads the lungs keeps its evidence there, one that reads burnt-in text, "
        "markers or borders does not."
    )


def _audit_and_gallery(stage: _Staging, model: Any, dataset: PreparedDataset, test: pd.DataFrame,
                       probabilities: np.ndarray, cells: np.ndarray,
                       cfg: EvaluateConfig) -> tuple[report.AuditSummary, bytes | None]:
    """Gallery and shortcut audit, logged; (the audit as the report shows it, the gallery PNG)."""
    nan = float("nan")
    problem = gradcam_unavailable(model)
    if problem:
        log.warning("%s", problem)
        tracking.log_metrics({"audit_n": 0, "audit_passed": 0})
        summary = report.AuditSummary(False, problem, nan, nan, nan, 0, cfg.min_lung_focus)
        return summary, None
    gallery = _log_gallery(stage, model, dataset, test, probabilities, cells, cfg)
    outcome, audited = shortcut_audit(model, dataset, test, cells, min_lung_focus=cfg.min_lung_focus,
                                      seed=cfg.seed, batch_size=cfg.batch_size)
    _log_audit(stage, outcome, audited, test, probabilities, cells, cfg.min_lung_focus)
    result = outcome.result
    tracking.log_metrics({
        "audit_lung_focus_mean": result.lung_focus_mean,
        "audit_lung_focus_median": result.lung_focus_median,
        "audit_border_share_mean": result.border_share_mean,
        "audit_n": result.n,
        "audit_passed": int(result.passed),
    })
    summary = report.AuditSummary(
        passed=result.passed, reason=result.reason, lung_focus_mean=result.lung_focus_mean,
        lung_focus_median=result.lung_focus_median, border_share_mean=result.border_share_mean, n=result.n,
        min_lung_focus=cfg.min_lung_focus, mask_source=outcome.mask_note,
        method=_audit_method_text(outcome.tolerance_px, dataset.positive_class),
    )
    return summary, gallery


def run(cfg: EvaluateConfig) -> str:
    """Evaluate ``cfg.model_uri`` on the test split as one MLflow run; returns the run id.

    Raises ``serving.ModelNotFound`` (unknown URI), ``PreparedDataError`` (dataset missing, prepared
    with other image settings, empty test split) or ``cli.UserError`` (bad flags) before the run starts.
    """
    from cxrexp import serving
    from cxrexp.dataset import predict_probabilities

    check_config(cfg)
    model, model_spec, model_threshold = serving.load_keras_model(cfg.model_uri)
    source = describe_model(cfg.model_uri)
    dataset, trained_on = resolve_data(cfg.data, source)
    check_spec(cfg.model_uri, model_spec, dataset)
    test = evaluation_frame(dataset)
    threshold = float(cfg.threshold) if cfg.threshold >= 0 else float(model_threshold)
    prevalence = float(cfg.prevalence) if cfg.prevalence >= 0 else None
    labels = test["label"].to_numpy(np.int64)
    training_digest = trained_on.digest if trained_on is not None else source.dataset_digest

    with tracking.step_run(
        "evaluate", cfg, run_name=source.run_name(),
        extra_params={"image_size": dataset.image_size, "model_threshold": model_threshold},
    ) as active:
        run_id = active.info.run_id
        mlflow.set_tags({
            "mlflow.runName": source.run_name(),  # also when resumed under `mlflow run`
            tracking.MODEL_URI_TAG: cfg.model_uri,
            MODEL_ID_TAG: source.model_id,
            REGISTERED_MODEL_TAG: source.registered_name,
            MODEL_VERSION_TAG: source.version,
            TRAIN_RUN_TAG: source.train_run_id,
            TRAINING_DIGEST_TAG: training_digest,
            "cxrexp.threshold_source": "flag" if cfg.threshold >= 0 else "model",
        })
        test_data = tracking.log_prepared_dataset(dataset, context="test")  # also tags prepared_dir and digest

        probabilities = predict_probabilities(
            model, dataset.images(), test["row"].to_numpy(np.int64), cfg.batch_size
        ).astype(np.float64)
        predicted = probabilities >= threshold
        evaluation = metrics.evaluate_predictions(
            labels, probabilities, threshold, n_bootstrap=cfg.n_bootstrap, seed=cfg.seed, prevalence=prevalence
        )
        overlap = training_overlap(test, trained_on, dataset.digest)
        _log_test_metrics(evaluation, len(test), threshold, overlap, source.model_id, test_data)
        cells = confusion_cells(labels, predicted)
        predictions = pd.DataFrame({
            "source": test["source"], "class_name": test["class_name"], "label": labels,
            "probability": probabilities, "predicted": predicted.astype(np.int64), "cell": cells,
        })
        tracking.log_frame(predictions, "predictions.csv")
        counts = metrics.confusion(labels, probabilities, threshold)
        mlflow_status = mlflow_cross_check(predictions, counts)
        mlflow.set_tag(MLFLOW_EVALUATE_TAG, mlflow_status[:500])

        stage = _Staging()
        try:
            figures = _log_figures(stage, labels, probabilities, threshold, counts, evaluation, dataset)
            audit, gallery = _audit_and_gallery(stage, model, dataset, test, probabilities, cells, cfg)
            mlflow.set_tags({AUDIT_TAG: "passed" if audit.passed else "failed", AUDIT_REASON_TAG: audit.reason[:500]})
            card = report.ModelCard(
                model_uri=cfg.model_uri,
                evaluate_run_id=run_id,
                train_run_id=source.train_run_id,
                data_source=f"{cfg.data or 'training dataset of the model'} ({dataset.root})",
                dataset_digest=dataset.digest,
                training_digest=training_digest,
                threshold=threshold,
                threshold_source="--threshold flag" if cfg.threshold >= 0 else "stored with the model, chosen on validation",
                metrics=evaluation.metrics,
                reasons=evaluation.reasons,
                model_version=f"{source.registered_name} v{source.version}" if source.version else "",
                model_id=source.model_id,
                positive_label=dataset.positive_class,
                negative_label=dataset.negative_label,
                n_test=len(test),
                details=[
                    ("Image preparation", ", ".join(f"{k}={v}" for k, v in asdict(model_spec).items())),
                    ("Bootstrap", f"{cfg.n_bootstrap} resamples, seed {cfg.seed}"),
                    ("Stated prevalence", f"{prevalence:g}" if prevalence is not None else "none"),
                ],
                figures=figures,
                gradcam=report.Figure("HiResCAM per confusion cell", gallery,
                                      "left: heatmap overlay, right: iso-contours at 0.5 and 0.75 of the peak")
                if gallery else None,
                audit=audit,
                notes=_card_notes(labels, dataset, training_digest, overlap, mlflow_status),
            )
            mlflow.log_text(report.render_html(card), "report.html")
        finally:
            stage.close()

        print(_summary(run_id, cfg.model_uri, evaluation.metrics, threshold, len(test), audit.passed, audit.reason))
        return run_id


def _card_notes(labels: np.ndarray, dataset: PreparedDataset, training_digest: str, overlap: int | None,
                mlflow_status: str) -> list[str]:
    notes = []
    n_pos = int(np.sum(labels))
    if n_pos == 0 or n_pos == len(labels):
        only = "no positives" if n_pos == 0 else "no negatives"
        notes.append(f"The test split has {only}: metrics that need both classes are undefined (see the table).")
    if training_digest and training_digest != dataset.digest:
        notes.append(
            f"Evaluated on dataset {dataset.digest}, not the training dataset {training_digest}"
            + (f"; {overlap} test images also appear in its train/val splits." if overlap else ".")
        )
    elif not training_digest:
        notes.append("The training dataset is unknown: overlap between test and training images was not checked.")
    notes.append(f"MLflow's default classifier evaluator on the same predictions: {mlflow_status}.")
    return notes


def _summary(run_id: str, model_uri: str, m: dict[str, float], threshold: float, n: int,
             passed: bool, reason: str) -> str:
    def show(name: str) -> str:
        value, low, high = m.get(name), m.get(f"{name}_ci_low"), m.get(f"{name}_ci_high")
        if not _finite(value):
            return f"{name} undefined"
        ci = f" [{low:.3f}-{high:.3f}]" if _finite(low) and _finite(high) else ""
        return f"{name} {value:.3f}{ci}"

    return (
        f"evaluate run {run_id}: {model_uri} on {n} test images at threshold {threshold:.3f}\n"
        f"  {show('roc_auc')}, {show('sensitivity')}, {show('specificity')}\n"
        f"  shortcut audit {'passed' if passed else 'FAILED'}: {reason}\n"
        f"  report: {mlflow.get_artifact_uri('report.html')}"
    )


__all__ = [
    "ModelSource",
    "check_config",
    "check_spec",
    "describe_model",
    "evaluation_frame",
    "gradcam_unavailable",
    "mlflow_cross_check",
    "resolve_data",
    "run",
    "training_dataset",
    "training_overlap",
]
