"""The test-split evaluation, computed (pure): which cases, which predictions, which cells and notes.

``cxrexp.mlflow_edge.evaluation_run`` loads the model, predicts and logs; everything that decides
what is computed and said about a test split lives here, on arrays and frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cxrexp.config import ImageSpec
from cxrexp.data.store import PreparedDataset
from cxrexp.errors import PreparedDataError
from cxrexp.evaluation import metrics
from cxrexp.evaluation.audit import (
    AUDIT_SAMPLE,
    SALIENT_LEVEL,
    confusion_cells,
    spec_mismatches,
)
from cxrexp.tags import NOTE_TAG_PREFIX


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


def training_overlap(test: pd.DataFrame, trained_on: PreparedDataset | None) -> int | None:
    """Test images whose content hash is in the training dataset's train/val splits (None: unknown).

    Always measured, also when the test split is the training dataset's own: the split is meant to be
    duplicate-aware, and this is the check that it was (a hash lookup over a few thousand rows is cheap).
    """
    if trained_on is None:
        return None
    seen = set(trained_on.manifest.loc[trained_on.manifest["split"].isin(["train", "val"]), "sha256"])
    return int(test["sha256"].isin(seen).sum())


@dataclass(frozen=True)
class TestEvaluation:
    """The test split judged at one threshold.

    ``evaluation``: metrics with CIs and the reasons for undefined ones; ``predicted``: bool (n,);
    ``cells``: the confusion cell of each case (``TP``/``FP``/``TN``/``FN``); ``counts``: the confusion
    counts; ``predictions``: one row per test case (source, class_name, label, probability, predicted, cell).
    """

    evaluation: metrics.Evaluation
    predicted: np.ndarray
    cells: np.ndarray
    counts: metrics.Confusion
    predictions: pd.DataFrame


def evaluate_test_split(test: pd.DataFrame, probabilities: np.ndarray, threshold: float, *, n_bootstrap: int,
                        seed: int, prevalence: float | None) -> TestEvaluation:
    """Metrics, cells and the predictions table of ``test`` (``evaluation_frame``) at ``threshold``.

    ``probabilities``: float64 (n,) in [0, 1], aligned with ``test``'s rows.
    """
    labels = test["label"].to_numpy(np.int64)
    predicted = probabilities >= threshold
    evaluation = metrics.evaluate_predictions(
        labels, probabilities, threshold, n_bootstrap=n_bootstrap, seed=seed, prevalence=prevalence
    )
    cells = confusion_cells(labels, predicted)
    predictions = pd.DataFrame({
        "source": test["source"], "class_name": test["class_name"], "label": labels,
        "probability": probabilities, "predicted": predicted.astype(np.int64), "cell": cells,
    })
    return TestEvaluation(evaluation, predicted, cells, metrics.confusion(labels, probabilities, threshold), predictions)


def finite(value: float) -> bool:
    return value is not None and math.isfinite(value)


def note_tags(reasons: dict[str, str]) -> dict[str, str]:
    """One tag per undefined point metric (the CI reasons are in metric_notes.json)."""
    return {
        f"{NOTE_TAG_PREFIX}test_{name}": reason[:500]
        for name, reason in reasons.items()
        if not name.endswith(("_ci_low", "_ci_high"))
    }


def audit_method_text(tolerance_px: int, positive_label: str) -> str:
    return (
        f"HiResCAM heatmaps (the Grad-CAM variant faithful to this network's dense head) of up to {AUDIT_SAMPLE} "
        f"seeded test cases the model calls {positive_label}. Lung focus is the share of each heatmap's salient "
        f"mass (values >= {SALIENT_LEVEL:g} of its peak) inside the lung mask (a real mask, the dataset's or a segmenter's, is widened by "
        f"{tolerance_px} px, one cell of the explained feature map; the geometric prior is used as it is); the "
        "mean is gated. A model that reads the lungs keeps its evidence there, one that reads burnt-in text, "
        "markers or borders does not."
    )


def card_notes(labels: np.ndarray, dataset: PreparedDataset, training_digest: str, overlap: int | None,
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


def summary_text(run_id: str, model_uri: str, m: dict[str, float], threshold: float, n: int,
             passed: bool, reason: str, report_uri: str) -> str:
    def show(name: str) -> str:
        value, low, high = m.get(name), m.get(f"{name}_ci_low"), m.get(f"{name}_ci_high")
        if not finite(value):
            return f"{name} undefined"
        ci = f" [{low:.3f}-{high:.3f}]" if finite(low) and finite(high) else ""
        return f"{name} {value:.3f}{ci}"

    return (
        f"evaluate run {run_id}: {model_uri} on {n} test images at threshold {threshold:.3f}\n"
        f"  {show('roc_auc')}, {show('sensitivity')}, {show('specificity')}\n"
        f"  shortcut audit {'passed' if passed else 'FAILED'}: {reason}\n"
        f"  report: {report_uri}"
    )


__all__ = [
    "TestEvaluation",
    "audit_method_text",
    "card_notes",
    "check_spec",
    "evaluate_test_split",
    "evaluation_frame",
    "finite",
    "note_tags",
    "summary_text",
    "training_overlap",
]
