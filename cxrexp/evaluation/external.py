"""External validation: a model judged on collections from other hospitals (pure).

``evaluate -P external=DIR[,DIR...]`` prepares each collection with the model's own image settings
(``mlflow_edge.evaluation_run``), then the functions here decide what is scored and said: which
images duplicate a training image (dropped and counted), the metric names, and the plain-words warning
when a collection's ROC-AUC interval lies wholly below the internal test split's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from cxrexp.data.split import duplicate_groups
from cxrexp.evaluation import metrics
from cxrexp.evaluation.metrics import metric_key
from cxrexp.evaluation.occlusion import OcclusionResult, occlusion_metrics

EXTERNAL_PREFIX = "external_"


def collection_names(folders: Sequence[str]) -> list[str]:
    """Metric-safe names, one per folder: the base name, lower case, ``-``/``.`` as ``_``, with ``_2``,
    ``_3`` ... on a collision (``/a/ext-other``, ``/b/ext-other`` -> ``ext_other``, ``ext_other_2``)."""
    names: list[str] = []
    for folder in folders:
        base = metric_key(Path(folder.rstrip("/")).name).lower().replace("-", "_").replace(".", "_") or "external"
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}_{n}"
        names.append(name)
    return names


def training_duplicates(external_sha256: Sequence[str], external_phash: Sequence[str], training_sha256: Sequence[str],
                        training_phash: Sequence[str], max_distance: int) -> np.ndarray:
    """bool (n_external,): True where an external image is an exact (sha256) or near (perceptual hash
    within ``max_distance`` bits) duplicate of a training image. Hashes as the manifest stores them
    (sha256 hex, phash hex)."""
    n = len(external_sha256)
    if n == 0:
        return np.zeros(0, bool)
    phashes = [int(h, 16) for h in (*external_phash, *training_phash)]
    groups = duplicate_groups([*external_sha256, *training_sha256], phashes, max_distance)
    training_groups = set(groups[n:].tolist())
    return np.array([g in training_groups for g in groups[:n]], dtype=bool)


@dataclass(frozen=True)
class ExternalResult:
    """One collection scored: ``evaluation`` at the model's threshold (metrics with CIs, reasons)."""

    name: str
    folder: str
    n: int
    n_positive: int
    n_dropped: int
    n_skipped: int
    evaluation: metrics.Evaluation
    warning: str = ""
    notes: list[str] = field(default_factory=list)
    # The occlusion check on the collection (None: not run or failed): on another hospital's films it
    # shows whether the ranking comes from the lungs or from what surrounds them.
    occlusion: OcclusionResult | None = None


def interval_below(internal: Mapping[str, float], external: Mapping[str, float], name: str = "roc_auc") -> bool:
    """True when the external interval of ``name`` lies wholly below the internal one (both defined)."""
    high, low = external.get(f"{name}_ci_high"), internal.get(f"{name}_ci_low")
    return high is not None and low is not None and math.isfinite(high) and math.isfinite(low) and high < low


def external_warning(name: str, internal: Mapping[str, float], external: Mapping[str, float]) -> str:
    """The model card's warning in plain words, or "" when the intervals overlap (or one is undefined)."""
    if not interval_below(internal, external):
        return ""
    return (f"On {name} the ROC-AUC ({external['roc_auc']:.3f}, 95% CI {external['roc_auc_ci_low']:.3f}-"
            f"{external['roc_auc_ci_high']:.3f}) lies wholly below the internal test split's "
            f"({internal['roc_auc']:.3f}, {internal['roc_auc_ci_low']:.3f}-{internal['roc_auc_ci_high']:.3f}): "
            "the model does worse on images from elsewhere, so the internal figure overstates how it generalises "
            "(a shortcut such as the source hospital is the usual cause).")


def card_values(result: ExternalResult) -> dict[str, float]:
    """What the model card's table shows for the collection: its metrics and, when the occlusion check
    ran, its ``occlusion_*`` figures (the same names as the internal test split's)."""
    return {**result.evaluation.metrics, **occlusion_metrics(result.occlusion)}


def logged_metrics(result: ExternalResult) -> dict[str, float]:
    """``external_<name>_<metric>`` for every metric of the evaluation, plus n, n_positive, n_dropped, and
    ``external_<name>_occlusion_*`` when the occlusion check ran."""
    prefix = f"{EXTERNAL_PREFIX}{result.name}_"
    values = {f"{prefix}{k}": v for k, v in result.evaluation.metrics.items()}
    values.update({f"{prefix}n": result.n, f"{prefix}n_positive": result.n_positive,
                   f"{prefix}n_dropped_duplicates": result.n_dropped, f"{prefix}n_skipped": result.n_skipped})
    values.update({f"{prefix}{k}": v for k, v in occlusion_metrics(result.occlusion).items()})
    return values


__all__ = [
    "EXTERNAL_PREFIX",
    "ExternalResult",
    "card_values",
    "collection_names",
    "external_warning",
    "interval_below",
    "logged_metrics",
    "training_duplicates",
]
