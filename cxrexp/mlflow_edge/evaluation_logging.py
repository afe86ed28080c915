"""Logging one evaluation to the active MLflow run: metrics, figures, Grad-CAM gallery, the audit (MLflow edge).

Each function logs one part of what ``evaluation_run`` promises (see its docstring) and returns
what the model card embeds (PNG bytes, the audit summary); what to compute is decided in
``cxrexp.evaluation`` (pure).
"""

from __future__ import annotations

import io
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from cxrexp.config import EvaluateConfig
from cxrexp.data.store import PreparedDataset
from cxrexp.evaluation import metrics, model_card, plots
from cxrexp.evaluation.audit import (
    CAM_METHOD,
    CELLS,
    AuditOutcome,
    display_pair,
    pick_per_cell,
    sample_order,
    shortcut_audit,
)
from cxrexp.evaluation.occlusion import VIEWS, OcclusionResult, occlusion_for
from cxrexp.evaluation.test_evaluation import audit_method_text, finite, note_tags
from cxrexp.mlflow_edge import tracking

log = logging.getLogger(__name__)


class Staging:
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


def _log_audit(stage: Staging, outcome: AuditOutcome, positions: np.ndarray, test: pd.DataFrame,
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
            "lung_focus_lift": [s["lung_focus_lift"] for s in outcome.scores],
            "note": [s["reason"] for s in outcome.scores],
        }
    )
    tracking.log_frame(scores, "audit/scores.csv")
    gated_focus = scores.loc[scores["gated"], "lung_focus"].to_numpy()
    stage.figure(plots.lung_focus_figure(gated_focus, min_lung_focus), "figures/lung_focus.png")


def _log_gallery(stage: Staging, model: Any, dataset: PreparedDataset, test: pd.DataFrame,
                 probabilities: np.ndarray, cells: np.ndarray, cfg: EvaluateConfig) -> bytes:
    """Per confusion cell, overlay and contour side by side on the stored (enhanced) image."""
    from cxrexp.evaluation import gradcam

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


def log_test_metrics(evaluation: metrics.Evaluation, n_test: int, threshold: float, overlap: int | None,
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
        mlflow.set_tags(note_tags(evaluation.reasons))


def log_figures(stage: Staging, labels: np.ndarray, probabilities: np.ndarray, threshold: float,
                 counts: metrics.Confusion, evaluation: metrics.Evaluation,
                 dataset: PreparedDataset) -> list[model_card.Figure]:
    """The five classification figures, logged under figures/ and returned for the report."""
    roc_ci = (evaluation.metrics["roc_auc_ci_low"], evaluation.metrics["roc_auc_ci_high"])
    sweep = metrics.threshold_sweep(labels, probabilities, np.linspace(0.0, 1.0, 101))
    tracking.log_frame(sweep, "threshold_sweep.csv")
    class_names = (dataset.negative_label, dataset.positive_class)
    drawn = [
        ("Confusion matrix", "confusion_matrix", plots.confusion_matrix_figure(counts, class_names, threshold),
         "rows: true class, columns: prediction at the operating threshold"),
        ("ROC curve", "roc", plots.roc_figure(labels, probabilities, threshold,
                                              roc_ci if all(map(finite, roc_ci)) else None),
         "the dot is the operating point"),
        ("Precision-recall curve", "pr", plots.pr_figure(labels, probabilities, threshold),
         "dashed: the test split's prevalence (a chance-level classifier)"),
        ("Calibration", "calibration", plots.calibration_figure(labels, probabilities),
         "observed positive fraction per probability bin"),
        ("Threshold sweep", "threshold_sweep", plots.threshold_sweep_figure(sweep, threshold),
         "how the rates trade off as the threshold moves"),
    ]
    return [model_card.Figure(title, stage.figure(fig, f"figures/{name}.png"), caption)
            for title, name, fig, caption in drawn]


def audit_and_gallery(stage: Staging, model: Any, dataset: PreparedDataset, test: pd.DataFrame,
                       probabilities: np.ndarray, cells: np.ndarray, cfg: EvaluateConfig, *,
                       segment: Any = None, segmenter_name: str = "") -> tuple[model_card.AuditSummary, bytes | None]:
    """Gallery and shortcut audit, logged; (the audit as the report shows it, the gallery PNG).

    segment: a lung segmenter's forward pass for test images without a stored mask (None: the
    geometric prior there). A NaN heatmap fails the audit with the reason; the rest of the run goes on.
    """
    nan = float("nan")
    from cxrexp.evaluation import (
        gradcam,  # TensorFlow: loaded only when a model is explained
    )

    problem = gradcam.unavailable_reason(model)
    if problem:
        log.warning("%s", problem)
        tracking.log_metrics({"audit_n": 0, "audit_passed": 0})
        summary = model_card.AuditSummary(False, problem, nan, nan, nan, 0, cfg.min_lung_focus,
                                           min_lung_focus_lift=cfg.min_lung_focus_lift)
        return summary, None
    try:
        gallery = _log_gallery(stage, model, dataset, test, probabilities, cells, cfg)
        outcome, audited = shortcut_audit(model, dataset, test, cells, min_lung_focus=cfg.min_lung_focus,
                                          seed=cfg.seed, batch_size=cfg.batch_size, segment=segment,
                                          segmenter_name=segmenter_name, min_heatmaps=cfg.min_audit_heatmaps,
                                          min_lung_focus_lift=cfg.min_lung_focus_lift)
    except gradcam.NonFiniteHeatmap as exc:
        log.error("shortcut audit: %s", exc)
        tracking.log_metrics({"audit_n": 0, "audit_passed": 0})
        return model_card.AuditSummary(False, f"failed: {exc}", nan, nan, nan, 0, cfg.min_lung_focus,
                                       min_lung_focus_lift=cfg.min_lung_focus_lift), None
    _log_audit(stage, outcome, audited, test, probabilities, cells, cfg.min_lung_focus)
    result = outcome.result
    tracking.log_metrics({
        "audit_lung_focus_mean": result.lung_focus_mean,
        "audit_lung_focus_median": result.lung_focus_median,
        "audit_lung_focus_lift_mean": result.lung_focus_lift_mean,
        "audit_border_share_mean": result.border_share_mean,
        "audit_n": result.n,
        "audit_passed": int(result.passed),
    })
    summary = model_card.AuditSummary(
        passed=result.passed, reason=result.reason, lung_focus_mean=result.lung_focus_mean,
        lung_focus_median=result.lung_focus_median, border_share_mean=result.border_share_mean, n=result.n,
        min_lung_focus=cfg.min_lung_focus, mask_source=outcome.mask_note,
        method=audit_method_text(outcome.tolerance_px, dataset.positive_class),
        lung_focus_lift_mean=result.lung_focus_lift_mean, min_lung_focus_lift=cfg.min_lung_focus_lift,
    )
    return summary, gallery


def occlusion(model: Any, dataset: PreparedDataset, frame: pd.DataFrame, cfg: EvaluateConfig, *,
              segment: Any = None, segmenter_name: str = "", label: str = "test split",
              whole: np.ndarray | None = None) -> tuple[OcclusionResult | None, str]:
    """The occlusion check (``occlusion.occlusion_for``) on ``frame``'s rows of ``dataset``, its reading
    printed under ``label``; (result, mask note). ``whole``: the model's probabilities for ``frame``'s
    rows, already computed. Not logged here: the caller names the metrics (the test split's
    ``occlusion_*``, an external collection's ``external_<name>_occlusion_*``). Any failure is logged as
    an error and leaves the rest of the evaluation as it is: (None, "failed: <reason>").
    """
    from cxrexp.data.tfdata import predict_probabilities

    def predict(pixels: np.ndarray) -> np.ndarray:
        return predict_probabilities(model, pixels, np.arange(len(pixels)), cfg.batch_size).astype(np.float64)

    try:
        result, note = occlusion_for(dataset, frame, predict, n_bootstrap=cfg.n_bootstrap, seed=cfg.seed,
                                     segment=segment, segmenter_name=segmenter_name, whole=whole,
                                     margin=cfg.occlusion_margin)
    except Exception as exc:  # noqa: BLE001 - a report-only check must not cost the evaluation (TF, OpenCV, memory)
        log.error("occlusion check on the %s: %s: %s", label, type(exc).__name__, exc)
        return None, f"failed: {type(exc).__name__}: {exc}"
    for line in result.reading or (result.reason,):
        print(f"occlusion ({label}): {line}")
    return result, note


def occlusion_figure(stage: Staging, result: OcclusionResult | None) -> model_card.Figure | None:
    """The views of one case of each class, logged as ``figures/occlusion_views.png`` (None: nothing to show)."""
    if result is None or not result.examples:
        return None
    try:
        fig = plots.gradcam_gallery(list(result.examples), ncols=len(VIEWS))
        png = stage.figure(fig, "figures/occlusion_views.png")
    except Exception as exc:  # noqa: BLE001 - a figure must not cost the report
        log.error("occlusion figure: %s: %s", type(exc).__name__, exc)
        return None
    return model_card.Figure("Occlusion views", png, "what the model was shown in each view, with its "
                             "probability, for the first case of each class that has a lung mask")


__all__ = ["Staging", "audit_and_gallery", "occlusion", "occlusion_figure", "log_figures", "log_test_metrics", "mlflow_cross_check"]
