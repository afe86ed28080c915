"""Binary classification metrics: confusion, rates, bootstrap CIs, thresholds, PPV at a prevalence.

Pure functions on arrays (no MLflow): ``evaluate_predictions`` returns the flat metric names the
evaluate entry point logs (it adds the ``test_`` prefix).

Conventions used everywhere in this module:

- ``labels``: int-like (N,) in {0, 1}, 1 = the positive class (COVID).
- ``probabilities``: float (N,) in [0, 1], the model's probability of the positive class.
- A case is predicted positive when ``probability >= threshold``.
- A rate whose denominator is zero (e.g. sensitivity with no positives) is NaN, never an exception;
  ``undefined_reasons`` says why in plain words.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    roc_auc_score,
    roc_curve,
)

from cxrexp.config import THRESHOLD_RULES

RATE_NAMES = ("accuracy", "sensitivity", "specificity", "ppv", "npv", "f1")
SCORE_NAMES = ("roc_auc", "pr_auc", "brier")
PREVALENCE_NAMES = ("ppv_at_prevalence", "npv_at_prevalence")
COUNT_NAMES = ("tp", "fp", "tn", "fn")

# Bootstrap resamples are processed in chunks so that the (chunk, N) count matrix stays near 32 MB.
_BOOTSTRAP_CELLS_PER_CHUNK = 4_000_000
# Thresholds from the data may be exactly 0 or 1 (saturated float32 sigmoids); clip into (0, 1).
_THRESHOLD_EPS = 1e-7


# --------------------------------------------------------------------------------------------------
# Input checks


def check_predictions(labels, probabilities) -> tuple[np.ndarray, np.ndarray]:
    """Validate predictions -> (labels int64 (N,) in {0, 1}, probabilities float64 (N,) in [0, 1]).

    Raises ValueError naming the problem (shape, length, labels not 0/1, probabilities outside [0, 1]).
    """
    labels_arr = np.asarray(labels)
    prob_arr = np.asarray(probabilities, dtype=np.float64)
    if labels_arr.ndim != 1 or prob_arr.ndim != 1:
        raise ValueError(
            f"labels and probabilities must be 1-D; got shapes {labels_arr.shape} and {prob_arr.shape} "
            "(flatten the model output with .ravel())"
        )
    if labels_arr.shape != prob_arr.shape:
        raise ValueError(
            f"labels ({labels_arr.shape[0]}) and probabilities ({prob_arr.shape[0]}) differ in length"
        )
    if labels_arr.size and not np.isin(labels_arr, (0, 1)).all():
        bad = np.unique(labels_arr[~np.isin(labels_arr, (0, 1))])[:5]
        raise ValueError(f"labels must be 0 or 1; found {bad.tolist()}")
    if prob_arr.size and (not np.isfinite(prob_arr).all() or prob_arr.min() < 0 or prob_arr.max() > 1):
        finite = prob_arr[np.isfinite(prob_arr)]
        raise ValueError(
            f"probabilities must be finite and in [0, 1]; found {np.count_nonzero(~np.isfinite(prob_arr))} "
            f"non-finite, range [{finite.min() if finite.size else 'n/a'}, "
            f"{finite.max() if finite.size else 'n/a'}] (pass the sigmoid output, not the logit)"
        )
    return labels_arr.astype(np.int64), prob_arr


def _check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not np.isfinite(threshold):
        raise ValueError(f"threshold={threshold} must be a finite number")
    return threshold


def _safe_divide(numerator, denominator):
    """Elementwise numerator / denominator with NaN where the denominator is 0 (no warnings)."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    out = np.full(np.broadcast(numerator, denominator).shape, np.nan)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


# --------------------------------------------------------------------------------------------------
# Confusion and rates


@dataclass(frozen=True)
class Confusion:
    """Counts at one threshold: true/false positives and negatives (ints >= 0)."""

    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    @property
    def positives(self) -> int:
        return self.tp + self.fn

    @property
    def negatives(self) -> int:
        return self.tn + self.fp


def confusion(labels, probabilities, threshold: float) -> Confusion:
    """Counts with ``probability >= threshold`` predicted positive. Empty inputs give all zeros."""
    labels_arr, prob_arr = check_predictions(labels, probabilities)
    predicted = prob_arr >= _check_threshold(threshold)
    actual = labels_arr == 1
    return Confusion(
        tp=int(np.count_nonzero(predicted & actual)),
        fp=int(np.count_nonzero(predicted & ~actual)),
        tn=int(np.count_nonzero(~predicted & ~actual)),
        fn=int(np.count_nonzero(~predicted & actual)),
    )


def _rates_from_counts(tp, fp, tn, fn) -> dict[str, np.ndarray]:
    """Vectorised rates on count arrays of any (equal) shape; NaN where a denominator is 0."""
    return {
        "accuracy": _safe_divide(np.add(tp, tn), np.add(np.add(tp, fp), np.add(tn, fn))),
        "sensitivity": _safe_divide(tp, np.add(tp, fn)),
        "specificity": _safe_divide(tn, np.add(tn, fp)),
        "ppv": _safe_divide(tp, np.add(tp, fp)),
        "npv": _safe_divide(tn, np.add(tn, fn)),
        # 2TP / (2TP + FP + FN): the harmonic mean of PPV and sensitivity, defined even when PPV is not
        # as long as there is a positive or a positive prediction.
        "f1": _safe_divide(np.multiply(2, tp), np.add(np.add(np.multiply(2, tp), fp), fn)),
    }


def rates(c: Confusion) -> dict[str, float]:
    """accuracy, sensitivity, specificity, ppv, npv, f1 as floats in [0, 1]; NaN when 0/0."""
    return {name: float(value) for name, value in _rates_from_counts(c.tp, c.fp, c.tn, c.fn).items()}


def undefined_reasons(c: Confusion, split: str = "test") -> dict[str, str]:
    """Plain-words reason for every rate of ``rates(c)`` that is NaN; defined rates are absent."""
    reasons: dict[str, str] = {}
    if c.n == 0:
        return {name: f"no cases in the {split} split" for name in RATE_NAMES}
    if c.positives == 0:
        reasons["sensitivity"] = f"no positives in the {split} split"
    if c.negatives == 0:
        reasons["specificity"] = f"no negatives in the {split} split"
    if c.tp + c.fp == 0:
        reasons["ppv"] = "no case predicted positive at this threshold"
    if c.tn + c.fn == 0:
        reasons["npv"] = "no case predicted negative at this threshold"
    if 2 * c.tp + c.fp + c.fn == 0:
        reasons["f1"] = f"no positives in the {split} split and no case predicted positive"
    return reasons


# --------------------------------------------------------------------------------------------------
# Predictive values at another prevalence (Bayes)


def _check_prevalence(prevalence: float) -> float:
    prevalence = float(prevalence)
    if not 0 <= prevalence <= 1:
        raise ValueError(f"prevalence={prevalence} must be in [0, 1] (e.g. 0.05 for 5 %)")
    return prevalence


def ppv_at_prevalence(sensitivity, specificity, prevalence: float):
    """PPV a test with this sensitivity/specificity would have where the disease has ``prevalence``.

    PPV = sens * prev / (sens * prev + (1 - spec) * (1 - prev)). Scalars give a float, arrays an array
    (used per bootstrap resample); NaN when the denominator is 0 or an input is NaN.
    """
    prevalence = _check_prevalence(prevalence)
    sens = np.asarray(sensitivity, dtype=np.float64)
    spec = np.asarray(specificity, dtype=np.float64)
    true_pos = sens * prevalence
    out = _safe_divide(true_pos, true_pos + (1 - spec) * (1 - prevalence))
    return float(out) if out.ndim == 0 else out


def npv_at_prevalence(sensitivity, specificity, prevalence: float):
    """NPV at ``prevalence``: spec * (1 - prev) / (spec * (1 - prev) + (1 - sens) * prev)."""
    prevalence = _check_prevalence(prevalence)
    sens = np.asarray(sensitivity, dtype=np.float64)
    spec = np.asarray(specificity, dtype=np.float64)
    true_neg = spec * (1 - prevalence)
    out = _safe_divide(true_neg, true_neg + (1 - sens) * prevalence)
    return float(out) if out.ndim == 0 else out


# --------------------------------------------------------------------------------------------------
# Threshold-free scores


def _both_classes(labels_arr: np.ndarray) -> bool:
    return labels_arr.size > 0 and 0 < labels_arr.sum() < labels_arr.size


def roc_auc(labels, probabilities) -> float:
    """Area under the ROC curve in [0, 1]; NaN when only one class (or nothing) is present."""
    labels_arr, prob_arr = check_predictions(labels, probabilities)
    if not _both_classes(labels_arr):
        return float("nan")
    return float(roc_auc_score(labels_arr, prob_arr))


def pr_auc(labels, probabilities) -> float:
    """Average precision (area under the precision-recall step curve); NaN with only one class."""
    labels_arr, prob_arr = check_predictions(labels, probabilities)
    if not _both_classes(labels_arr):
        return float("nan")
    return float(average_precision_score(labels_arr, prob_arr))


def brier(labels, probabilities) -> float:
    """Mean squared error of the probabilities, in [0, 1] (lower is better); NaN when empty.

    Unlike the AUCs it is defined with a single class (it then measures how close to 0 or 1 the
    probabilities are), so it stays a number there.
    """
    labels_arr, prob_arr = check_predictions(labels, probabilities)
    if labels_arr.size == 0:
        return float("nan")
    return float(brier_score_loss(labels_arr, prob_arr, pos_label=1))


def auc_standard_error(auc: float, n_positive: int, n_negative: int) -> float:
    """Hanley & McNeil's (Radiology 1982) standard error of an ROC-AUC from the class counts alone.

    Used before any model exists, to say how sharply a split can tell two AUCs apart (the study's
    pruner and best trial read the validation split); a bootstrap of real predictions is the better
    interval once there are any (``bootstrap_ci``). It assumes exponential score distributions; for
    normal ones it is conservative, overstating the sampling SE by ~5% at AUC 0.7 to ~35% at 0.95
    (simulated in tests/test_metrics.py). 0 at AUC 0 or 1.
    """
    if n_positive < 1 or n_negative < 1:
        raise ValueError(f"n_positive={n_positive}, n_negative={n_negative}: an AUC needs both classes")
    if not 0.0 <= auc <= 1.0:
        raise ValueError(f"auc={auc} must be in [0, 1]")
    q1 = auc / (2.0 - auc)  # P(two random positives both outrank one negative)
    q2 = 2.0 * auc * auc / (1.0 + auc)  # P(one positive outranks two random negatives)
    variance = (
        auc * (1.0 - auc) + (n_positive - 1) * (q1 - auc * auc) + (n_negative - 1) * (q2 - auc * auc)
    ) / (n_positive * n_negative)
    return float(np.sqrt(max(variance, 0.0)))


def _score_reasons(labels_arr: np.ndarray, split: str) -> dict[str, str]:
    if labels_arr.size == 0:
        return {name: f"no cases in the {split} split" for name in SCORE_NAMES}
    if labels_arr.sum() == 0:
        only = "no positives"
    elif labels_arr.sum() == labels_arr.size:
        only = "no negatives"
    else:
        return {}
    return {
        "roc_auc": f"{only} in the {split} split: ROC AUC needs both classes",
        "pr_auc": f"{only} in the {split} split: average precision needs both classes",
    }


# --------------------------------------------------------------------------------------------------
# Bootstrap


def _resample_counts(index_matrix: np.ndarray, n: int) -> np.ndarray:
    """(B, N) int index matrix -> (B, N) float64: how often each case appears in each resample."""
    n_rows = index_matrix.shape[0]
    flat = (index_matrix + np.arange(n_rows)[:, None] * n).ravel()
    return np.bincount(flat, minlength=n_rows * n).reshape(n_rows, n).astype(np.float64)


def _resample_metrics(
    labels_arr: np.ndarray,
    prob_arr: np.ndarray,
    threshold: float,
    index_matrix: np.ndarray,
    prevalence: float | None = None,
) -> dict[str, np.ndarray]:
    """Every metric of every resample; ``index_matrix`` int (B, N) picks the cases of each resample.

    Works on multiplicity counts rather than gathered (B, N) arrays: every metric is then a weighted
    sum over the original cases, and both AUCs come from per-distinct-score counts (ties grouped the
    way scikit-learn groups them), so no per-resample Python loop or sort is needed.
    Returns name -> float64 (B,), NaN where the metric is undefined for that resample.
    """
    n = labels_arr.size
    counts = _resample_counts(index_matrix, n)  # (B, N)
    positive = labels_arr.astype(np.float64)
    negative = 1.0 - positive
    predicted = (prob_arr >= threshold).astype(np.float64)

    tp = counts @ (positive * predicted)
    fp = counts @ (negative * predicted)
    tn = counts @ (negative * (1 - predicted))
    fn = counts @ (positive * (1 - predicted))
    out = _rates_from_counts(tp, fp, tn, fn)

    n_pos = tp + fn
    n_neg = tn + fp
    both = (n_pos > 0) & (n_neg > 0)

    # Group the cases by distinct score, ascending: per-resample positive/negative counts per score.
    order = np.argsort(prob_arr, kind="stable")
    sorted_scores = prob_arr[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    counts_sorted = counts[:, order]
    pos_per_score = np.add.reduceat(counts_sorted * positive[order], starts, axis=1)  # (B, U)
    neg_per_score = np.add.reduceat(counts_sorted * negative[order], starts, axis=1)

    # ROC AUC (Mann-Whitney): each positive beats the negatives below its score, ties count half.
    neg_below = np.cumsum(neg_per_score, axis=1) - neg_per_score
    wins = np.sum(pos_per_score * (neg_below + 0.5 * neg_per_score), axis=1)
    out["roc_auc"] = np.where(both, _safe_divide(wins, n_pos * n_neg), np.nan)

    # Average precision: sum over distinct thresholds (descending) of recall gain x precision.
    pos_desc = pos_per_score[:, ::-1]
    tp_cum = np.cumsum(pos_desc, axis=1)
    predicted_cum = tp_cum + np.cumsum(neg_per_score[:, ::-1], axis=1)
    precision = np.where(predicted_cum > 0, tp_cum / np.maximum(predicted_cum, 1.0), 0.0)
    out["pr_auc"] = np.where(both, _safe_divide(np.sum(pos_desc * precision, axis=1), n_pos), np.nan)

    out["brier"] = _safe_divide(counts @ (prob_arr - positive) ** 2, np.full(counts.shape[0], n))
    if prevalence is not None:
        out["ppv_at_prevalence"] = ppv_at_prevalence(out["sensitivity"], out["specificity"], prevalence)
        out["npv_at_prevalence"] = npv_at_prevalence(out["sensitivity"], out["specificity"], prevalence)
    return out


def _bootstrap_distribution(
    labels_arr: np.ndarray,
    prob_arr: np.ndarray,
    threshold: float,
    n_bootstrap: int,
    seed: int,
    prevalence: float | None,
) -> dict[str, np.ndarray]:
    """name -> float64 (n_bootstrap,) metric values over seeded resamples of the cases."""
    n = labels_arr.size
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_bootstrap, _BOOTSTRAP_CELLS_PER_CHUNK // max(n, 1)))
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, n_bootstrap, chunk):
        rows = min(chunk, n_bootstrap - start)
        index_matrix = rng.integers(0, n, size=(rows, n))
        parts.append(_resample_metrics(labels_arr, prob_arr, threshold, index_matrix, prevalence))
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


@dataclass(frozen=True)
class PairedDifference:
    """``metric`` of B minus that of A on the same cases, with a paired percentile bootstrap interval.

    estimate: on all cases; (low, high): the (1 - alpha) interval of the resampled differences;
    n_resamples: resamples where the metric was defined for both (e.g. both classes drawn).
    """

    metric: str
    estimate: float
    low: float
    high: float
    n_resamples: int


def paired_difference(
    labels,
    probabilities_a,
    probabilities_b,
    metric: str = "roc_auc",
    *,
    threshold_a: float = 0.5,
    threshold_b: float = 0.5,
    n_bootstrap: int = 2000,
    seed: int = 42,
    alpha: float = 0.05,
) -> PairedDifference:
    """Paired bootstrap of ``metric(B) - metric(A)``: both models are scored on the *same* resampled
    cases each time, so the case mix's noise, shared by both, cancels out of the difference (an
    unpaired comparison of two intervals is far wider). Thresholds matter only for the rates."""
    labels_arr, prob_a = check_predictions(labels, probabilities_a)
    _, prob_b = check_predictions(labels, probabilities_b)
    if metric not in RATE_NAMES + SCORE_NAMES:
        raise ValueError(f"metric={metric!r} is not one of {RATE_NAMES + SCORE_NAMES}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha} must be in (0, 1), e.g. 0.05 for 95 % intervals")
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap={n_bootstrap} must be at least 1")
    everything = np.arange(labels_arr.size)[None, :]
    estimate = float(_resample_metrics(labels_arr, prob_b, _check_threshold(threshold_b), everything)[metric][0]
                     - _resample_metrics(labels_arr, prob_a, _check_threshold(threshold_a), everything)[metric][0])
    rng = np.random.default_rng(seed)
    n = labels_arr.size
    chunk = max(1, min(n_bootstrap, _BOOTSTRAP_CELLS_PER_CHUNK // max(n, 1)))
    parts = []
    for start in range(0, n_bootstrap, chunk):
        index_matrix = rng.integers(0, n, size=(min(chunk, n_bootstrap - start), n))
        parts.append(_resample_metrics(labels_arr, prob_b, threshold_b, index_matrix)[metric]
                     - _resample_metrics(labels_arr, prob_a, threshold_a, index_matrix)[metric])
    differences = np.concatenate(parts)
    differences = differences[np.isfinite(differences)]
    if differences.size == 0:
        return PairedDifference(metric, estimate, float("nan"), float("nan"), 0)
    low, high = np.percentile(differences, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return PairedDifference(metric, estimate, float(low), float(high), int(differences.size))


def _metric_names(prevalence: float | None) -> tuple[str, ...]:
    return RATE_NAMES + SCORE_NAMES + (PREVALENCE_NAMES if prevalence is not None else ())


def bootstrap_ci(
    labels,
    probabilities,
    threshold: float,
    n_bootstrap: int,
    seed: int,
    alpha: float = 0.05,
    prevalence: float | None = None,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap (1 - alpha) intervals for every rate, roc_auc, pr_auc and brier.

    Cases are resampled with replacement ``n_bootstrap`` times from ``np.random.default_rng(seed)``
    (same inputs and seed -> same intervals). Resamples where a metric is undefined (e.g. no positive
    drawn) are dropped for that metric; a metric undefined in every resample gets (NaN, NaN).
    With ``prevalence`` the intervals of ppv/npv_at_prevalence are added.
    Returns name -> (low, high), floats.
    """
    labels_arr, prob_arr = check_predictions(labels, probabilities)
    threshold = _check_threshold(threshold)
    if prevalence is not None:
        prevalence = _check_prevalence(prevalence)
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha} must be in (0, 1), e.g. 0.05 for 95 % intervals")
    names = _metric_names(prevalence)
    if n_bootstrap <= 0 or labels_arr.size == 0:
        return {name: (float("nan"), float("nan")) for name in names}
    distribution = _bootstrap_distribution(labels_arr, prob_arr, threshold, n_bootstrap, seed, prevalence)
    out: dict[str, tuple[float, float]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns -> NaN, which is what we want
        for name in names:
            low, high = np.nanpercentile(distribution[name], [100 * alpha / 2, 100 * (1 - alpha / 2)])
            out[name] = (float(low), float(high))
    return out


# --------------------------------------------------------------------------------------------------
# The flat metric set logged by `evaluate`


@dataclass(frozen=True)
class Evaluation:
    """What ``evaluate_predictions`` returns.

    ``metrics``: flat name -> float, the names logged to MLflow (without the ``test_`` prefix):
    tp fp tn fn prevalence accuracy sensitivity specificity ppv npv f1 roc_auc pr_auc brier, the last
    nine each with ``_ci_low``/``_ci_high``, plus ``ppv_at_prevalence``/``npv_at_prevalence`` (and CIs)
    when a prevalence was given. NaN marks an undefined value.
    ``reasons``: metric name -> plain reason, for every NaN in ``metrics`` (CI keys included).
    """

    metrics: dict[str, float]
    reasons: dict[str, str] = field(default_factory=dict)


def evaluate_predictions(
    labels,
    probabilities,
    threshold: float,
    *,
    n_bootstrap: int,
    seed: int,
    prevalence: float | None = None,
    alpha: float = 0.05,
    split: str = "test",
) -> Evaluation:
    """Point estimates, bootstrap CIs and NaN reasons for one split at one threshold.

    ``prevalence`` (in [0, 1]) adds the PPV/NPV the classifier would have at that prevalence (Bayes
    from the split's sensitivity and specificity); ``split`` only words the reasons.
    """
    labels_arr, prob_arr = check_predictions(labels, probabilities)
    threshold = _check_threshold(threshold)
    if prevalence is not None:
        prevalence = _check_prevalence(prevalence)
    counts = confusion(labels_arr, prob_arr, threshold)
    point = rates(counts)
    point["roc_auc"] = roc_auc(labels_arr, prob_arr)
    point["pr_auc"] = pr_auc(labels_arr, prob_arr)
    point["brier"] = brier(labels_arr, prob_arr)
    reasons = {**undefined_reasons(counts, split), **_score_reasons(labels_arr, split)}
    if labels_arr.size == 0:
        reasons["brier"] = f"no cases in the {split} split"
    if prevalence is not None:
        for name, fn in (("ppv_at_prevalence", ppv_at_prevalence), ("npv_at_prevalence", npv_at_prevalence)):
            point[name] = fn(point["sensitivity"], point["specificity"], prevalence)
            if np.isnan(point[name]):
                reasons[name] = (
                    f"undefined at prevalence {prevalence:g} with sensitivity {point['sensitivity']:.3g} "
                    f"and specificity {point['specificity']:.3g}"
                )

    metrics: dict[str, float] = {name: float(getattr(counts, name)) for name in COUNT_NAMES}
    metrics["prevalence"] = float(labels_arr.mean()) if labels_arr.size else float("nan")
    if labels_arr.size == 0:
        reasons["prevalence"] = f"no cases in the {split} split"

    intervals = bootstrap_ci(
        labels_arr, prob_arr, threshold, n_bootstrap, seed, alpha=alpha, prevalence=prevalence
    )
    for name in _metric_names(prevalence):
        low, high = intervals[name]
        metrics[name] = point[name]
        metrics[f"{name}_ci_low"] = low
        metrics[f"{name}_ci_high"] = high
        if np.isnan(low):
            if n_bootstrap <= 0:
                why = f"bootstrap disabled (n_bootstrap={n_bootstrap})"
            elif name in reasons:
                why = reasons[name]
            else:
                why = f"undefined in every one of {n_bootstrap} bootstrap resamples"
            reasons[f"{name}_ci_low"] = reasons[f"{name}_ci_high"] = why
    return Evaluation(metrics=metrics, reasons=reasons)


# --------------------------------------------------------------------------------------------------
# Threshold choice (on the validation split)


def _roc_points(labels, probabilities, purpose: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    labels_arr, prob_arr = check_predictions(labels, probabilities)
    if not _both_classes(labels_arr):
        raise ValueError(
            f"{purpose} needs both classes; got {int(labels_arr.sum())} positives among "
            f"{labels_arr.size} cases (use a larger validation split, e.g. a higher val_frac)"
        )
    # Keep every threshold: dropping collinear points could skip the first one reaching a target.
    fpr, tpr, thresholds = roc_curve(labels_arr, prob_arr, drop_intermediate=False)
    return fpr, tpr, thresholds


def choose_threshold(labels, probabilities, rule: str, target_sensitivity: float = 0.95,
                     target_specificity: float = 0.95) -> float:
    """Operating threshold in (0, 1) chosen on validation predictions.

    ``specificity``: the most sensitive operating point whose specificity is >= ``target_specificity``
    (the highest sensitivity the target allows, at the highest threshold that reaches it).
    ``youden``: the ROC threshold maximising sensitivity + specificity - 1 (the highest one on ties).
    ``sensitivity``: the highest threshold whose sensitivity is >= ``target_sensitivity`` (the most
    specific operating point meeting the target).
    Thresholds are observed probabilities; the result is clipped into [1e-7, 1 - 1e-7] because
    scikit-learn's first ROC threshold is +inf. Raises ValueError when only one class is present.
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"rule={rule!r} is not one of {THRESHOLD_RULES}")
    fpr, tpr, thresholds = _roc_points(labels, probabilities, f"choose_threshold(rule={rule!r})")
    if rule == "youden":
        best = int(np.argmax(tpr - fpr))
    elif rule == "specificity":
        if not 0 < target_specificity <= 1:
            raise ValueError(f"target_specificity={target_specificity} must be in (0, 1]")
        # Thresholds fall along the curve, so the points meeting the target are a prefix (the +inf
        # threshold, fpr = 0, always qualifies); within it sensitivity only rises: take its first maximum.
        meets = np.flatnonzero((1 - fpr) >= target_specificity - 1e-12)
        best = int(meets[np.argmax(tpr[meets])])
    else:
        if not 0 < target_sensitivity <= 1:
            raise ValueError(f"target_sensitivity={target_sensitivity} must be in (0, 1]")
        # tpr is non-decreasing as thresholds fall; the last point has tpr = 1, so one always exists.
        best = int(np.argmax(tpr >= target_sensitivity - 1e-12))
    return float(np.clip(thresholds[best], _THRESHOLD_EPS, 1 - _THRESHOLD_EPS))


def sensitivity_at_specificity(labels, probabilities, target_specificity: float) -> float:
    """Highest sensitivity over thresholds whose specificity is >= ``target_specificity``.

    In [0, 1] (an Optuna objective); NaN when only one class is present.
    """
    if not 0 <= target_specificity <= 1:
        raise ValueError(f"target_specificity={target_specificity} must be in [0, 1]")
    labels_arr, prob_arr = check_predictions(labels, probabilities)
    if not _both_classes(labels_arr):
        return float("nan")
    fpr, tpr, _ = _roc_points(labels_arr, prob_arr, "sensitivity_at_specificity")
    # The +inf threshold (fpr = 0) always qualifies, so the mask is never empty.
    return float(tpr[(1 - fpr) >= target_specificity - 1e-12].max())


def threshold_sweep(labels, probabilities, thresholds) -> pd.DataFrame:
    """One row per threshold: threshold, sensitivity, specificity, ppv, npv (float, NaN when 0/0)."""
    labels_arr, prob_arr = check_predictions(labels, probabilities)
    threshold_arr = np.asarray(thresholds, dtype=np.float64).ravel()
    if not np.isfinite(threshold_arr).all():
        raise ValueError("thresholds must be finite numbers")
    predicted = prob_arr[None, :] >= threshold_arr[:, None]  # (T, N)
    actual = labels_arr[None, :] == 1
    tp = np.count_nonzero(predicted & actual, axis=1)
    fp = np.count_nonzero(predicted & ~actual, axis=1)
    tn = np.count_nonzero(~predicted & ~actual, axis=1)
    fn = np.count_nonzero(~predicted & actual, axis=1)
    swept = _rates_from_counts(tp, fp, tn, fn)
    return pd.DataFrame(
        {
            "threshold": threshold_arr,
            "sensitivity": swept["sensitivity"],
            "specificity": swept["specificity"],
            "ppv": swept["ppv"],
            "npv": swept["npv"],
        }
    )


def metric_key(text: str) -> str:
    """A name such as ``Viral Pneumonia`` or ``ext-other`` as a metric-name fragment (``Viral_Pneumonia``)."""
    return re.sub(r"[^0-9A-Za-z_.-]+", "_", text).strip("_")


__all__ = [
    "metric_key",
    "Confusion",
    "Evaluation",
    "PairedDifference",
    "RATE_NAMES",
    "SCORE_NAMES",
    "auc_standard_error",
    "bootstrap_ci",
    "brier",
    "check_predictions",
    "choose_threshold",
    "confusion",
    "evaluate_predictions",
    "npv_at_prevalence",
    "paired_difference",
    "ppv_at_prevalence",
    "pr_auc",
    "rates",
    "roc_auc",
    "sensitivity_at_specificity",
    "threshold_sweep",
    "undefined_reasons",
]
