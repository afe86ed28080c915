"""cxrexp.metrics on tiny hand-made arrays with hand-computed expectations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from cxrexp.evaluation import metrics
from cxrexp.evaluation.metrics import Confusion

NAN = float("nan")


def assert_same(actual: float, expected: float) -> None:
    """Equal within 1e-12, NaN equal to NaN."""
    if math.isnan(expected):
        assert math.isnan(actual), f"expected NaN, got {actual}"
    else:
        assert actual == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------------------------------------- #
# Confusion and rates

CONFUSION_CASES = {
    # id: (labels, probabilities, threshold, Confusion, rates, reasons for the NaN rates)
    "mixed": (
        [1, 1, 0, 0, 1, 0], [0.9, 0.4, 0.6, 0.1, 0.5, 0.5], 0.5, Confusion(tp=2, fp=2, tn=1, fn=1),
        dict(accuracy=3 / 6, sensitivity=2 / 3, specificity=1 / 3, ppv=2 / 4, npv=1 / 2, f1=4 / 7),
        {},
    ),
    "probability equal to threshold is positive": (
        [1], [0.5], 0.5, Confusion(tp=1, fp=0, tn=0, fn=0),
        dict(accuracy=1.0, sensitivity=1.0, specificity=NAN, ppv=1.0, npv=NAN, f1=1.0),
        {"specificity": "no negatives in the test split", "npv": "no case predicted negative at this threshold"},
    ),
    "no positives": (
        [0, 0, 0], [0.2, 0.7, 0.4], 0.5, Confusion(tp=0, fp=1, tn=2, fn=0),
        dict(accuracy=2 / 3, sensitivity=NAN, specificity=2 / 3, ppv=0.0, npv=1.0, f1=0.0),
        {"sensitivity": "no positives in the test split"},
    ),
    "all predicted negative": (
        [1, 0, 1, 0], [0.1, 0.2, 0.3, 0.4], 0.5, Confusion(tp=0, fp=0, tn=2, fn=2),
        dict(accuracy=0.5, sensitivity=0.0, specificity=1.0, ppv=NAN, npv=0.5, f1=0.0),
        {"ppv": "no case predicted positive at this threshold"},
    ),
    "no positives, none predicted positive": (
        [0, 0], [0.1, 0.2], 0.5, Confusion(tp=0, fp=0, tn=2, fn=0),
        dict(accuracy=1.0, sensitivity=NAN, specificity=1.0, ppv=NAN, npv=1.0, f1=NAN),
        {
            "sensitivity": "no positives in the test split",
            "ppv": "no case predicted positive at this threshold",
            "f1": "no positives in the test split and no case predicted positive",
        },
    ),
    "empty": (
        [], [], 0.5, Confusion(0, 0, 0, 0),
        {name: NAN for name in metrics.RATE_NAMES},
        {name: "no cases in the test split" for name in metrics.RATE_NAMES},
    ),
}


@pytest.mark.parametrize("case", CONFUSION_CASES.values(), ids=CONFUSION_CASES.keys())
def test_confusion_rates_and_reasons(case):
    labels, probabilities, threshold, expected_confusion, expected_rates, expected_reasons = case
    counts = metrics.confusion(labels, probabilities, threshold)
    assert counts == expected_confusion
    got = metrics.rates(counts)
    assert set(got) == set(metrics.RATE_NAMES)
    for name, expected in expected_rates.items():
        assert_same(got[name], expected)
    assert metrics.undefined_reasons(counts) == expected_reasons
    # Every NaN has a reason and every reason belongs to a NaN.
    assert {name for name, value in got.items() if math.isnan(value)} == set(expected_reasons)


def test_reasons_name_the_split():
    assert metrics.undefined_reasons(Confusion(0, 1, 2, 0), split="val") == {
        "sensitivity": "no positives in the val split"
    }


@pytest.mark.parametrize(
    "labels, probabilities, message",
    [
        ([0, 2], [0.1, 0.2], "labels must be 0 or 1"),
        ([0, 1], [0.1, 1.5], "in \\[0, 1\\]"),
        ([0, 1], [0.1, float("nan")], "finite"),
        ([0, 1, 1], [0.1, 0.2], "differ in length"),
        ([[0, 1]], [[0.1, 0.2]], "1-D"),
    ],
)
def test_bad_inputs_raise_with_the_problem(labels, probabilities, message):
    with pytest.raises(ValueError, match=message):
        metrics.confusion(labels, probabilities, 0.5)


# ---------------------------------------------------------------------------------------------- #
# PPV / NPV at a prevalence


@pytest.mark.parametrize(
    "sensitivity, specificity, prevalence, ppv, npv",
    [
        # 0.9*0.1 / (0.09 + 0.2*0.9) = 0.09/0.27;  0.8*0.9 / (0.72 + 0.1*0.1) = 0.72/0.73
        (0.9, 0.8, 0.1, 1 / 3, 0.72 / 0.73),
        # symmetric test at 5 %: half of the positive calls are true
        (0.95, 0.95, 0.05, 0.5, 0.9025 / 0.905),
        # never calls positive: PPV 0/0; NPV = 0.7 / (0.7 + 0.3)
        (0.0, 1.0, 0.3, NAN, 0.7),
        # disease absent: every positive call is false, every negative call true
        (0.8, 0.8, 0.0, 0.0, 1.0),
        (NAN, 0.8, 0.1, NAN, NAN),
    ],
)
def test_predictive_values_at_prevalence(sensitivity, specificity, prevalence, ppv, npv):
    assert_same(metrics.ppv_at_prevalence(sensitivity, specificity, prevalence), ppv)
    assert_same(metrics.npv_at_prevalence(sensitivity, specificity, prevalence), npv)


def test_ppv_at_the_sample_prevalence_is_the_sample_ppv():
    labels, probabilities, threshold, *_ = CONFUSION_CASES["mixed"]
    sample = metrics.rates(metrics.confusion(labels, probabilities, threshold))
    prevalence = float(np.mean(labels))
    sens, spec = sample["sensitivity"], sample["specificity"]
    assert metrics.ppv_at_prevalence(sens, spec, prevalence) == pytest.approx(sample["ppv"])
    assert metrics.npv_at_prevalence(sens, spec, prevalence) == pytest.approx(sample["npv"])


@pytest.mark.parametrize("prevalence", [-0.1, 1.5])
def test_prevalence_out_of_range_raises(prevalence):
    with pytest.raises(ValueError, match="prevalence"):
        metrics.ppv_at_prevalence(0.9, 0.9, prevalence)


# ---------------------------------------------------------------------------------------------- #
# Threshold-free scores

SCORE_CASES = {
    # pairs (pos, neg): 0.35>0.1, 0.35<0.4, 0.8>0.1, 0.8>0.4 -> 3/4.
    # AP: descending 0.8 (pos: P=1, R=.5), 0.4 (neg), 0.35 (pos: P=2/3, R=1) -> .5*1 + .5*2/3.
    # Brier: (0.01 + 0.16 + 0.4225 + 0.04) / 4.
    "one inversion": ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], 0.75, 0.5 + 1 / 3, 0.6325 / 4),
    "separable": ([0, 1], [0.2, 0.9], 1.0, 1.0, (0.04 + 0.01) / 2),
    "reversed": ([1, 0], [0.2, 0.9], 0.0, 0.5, (0.64 + 0.81) / 2),
    "tie counts half": ([0, 1], [0.5, 0.5], 0.5, 0.5, 0.25),
    "only negatives": ([0, 0], [0.1, 0.3], NAN, NAN, (0.01 + 0.09) / 2),
    "only positives": ([1, 1], [0.9, 0.5], NAN, NAN, (0.01 + 0.25) / 2),
    "empty": ([], [], NAN, NAN, NAN),
}


@pytest.mark.parametrize("case", SCORE_CASES.values(), ids=SCORE_CASES.keys())
def test_scores_by_hand(case):
    labels, probabilities, auc, average_precision, brier_score = case
    assert_same(metrics.roc_auc(labels, probabilities), auc)
    assert_same(metrics.pr_auc(labels, probabilities), average_precision)
    assert_same(metrics.brier(labels, probabilities), brier_score)


# ---------------------------------------------------------------------------------------------- #
# Bootstrap


def synthetic_predictions(n: int, seed: int, prevalence: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping classes (AUC ~0.85), probabilities rounded to 2 decimals so ties occur."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < prevalence).astype(int)
    logits = rng.normal(np.where(labels == 1, 1.0, -1.0), 1.0)
    return labels, np.round(1 / (1 + np.exp(-logits)), 2)


def test_resampled_metrics_match_sklearn_on_each_resample():
    """The vectorised per-resample maths equals computing each resample from scratch."""
    labels, probabilities = synthetic_predictions(300, seed=0)
    index_matrix = np.random.default_rng(1).integers(0, labels.size, size=(8, labels.size))
    resampled = metrics._resample_metrics(labels, probabilities, 0.5, index_matrix, prevalence=0.1)
    for row, idx in enumerate(index_matrix):
        y, p = labels[idx], probabilities[idx]
        assert resampled["roc_auc"][row] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
        assert resampled["pr_auc"][row] == pytest.approx(average_precision_score(y, p), abs=1e-12)
        assert resampled["brier"][row] == pytest.approx(np.mean((p - y) ** 2), abs=1e-12)
        rates = metrics.rates(metrics.confusion(y, p, 0.5))
        for name, value in rates.items():
            assert resampled[name][row] == pytest.approx(value, abs=1e-12)
        assert resampled["ppv_at_prevalence"][row] == pytest.approx(
            metrics.ppv_at_prevalence(rates["sensitivity"], rates["specificity"], 0.1)
        )


@pytest.fixture(scope="module")
def small_and_large():
    """Point estimates and CIs for n=100 and n=2000 drawn from the same distribution."""
    out = {}
    for n in (100, 2000):
        labels, probabilities = synthetic_predictions(n, seed=n)
        out[n] = metrics.evaluate_predictions(
            labels, probabilities, 0.5, n_bootstrap=1000, seed=7, prevalence=0.05
        ).metrics
    return out


CI_METRICS = metrics.RATE_NAMES + metrics.SCORE_NAMES + ("ppv_at_prevalence", "npv_at_prevalence")


@pytest.mark.parametrize("name", CI_METRICS)
def test_ci_contains_point_and_narrows_with_more_cases(small_and_large, name):
    for n, result in small_and_large.items():
        assert result[f"{name}_ci_low"] <= result[name] <= result[f"{name}_ci_high"], (n, name)
    width = {n: r[f"{name}_ci_high"] - r[f"{name}_ci_low"] for n, r in small_and_large.items()}
    assert 0 < width[2000] < width[100] / 2  # ~sqrt(20) ~ 4.5 times narrower in theory


def test_bootstrap_is_deterministic_for_a_seed():
    labels, probabilities = synthetic_predictions(200, seed=3)
    first = metrics.bootstrap_ci(labels, probabilities, 0.5, n_bootstrap=300, seed=11)
    again = metrics.bootstrap_ci(labels, probabilities, 0.5, n_bootstrap=300, seed=11)
    other = metrics.bootstrap_ci(labels, probabilities, 0.5, n_bootstrap=300, seed=12)
    assert first == again
    assert first != other
    assert set(first) == set(metrics.RATE_NAMES + metrics.SCORE_NAMES)


def test_bootstrap_drops_undefined_resamples():
    # 1 positive in 40: many resamples draw no positive; sensitivity is computed from the others.
    labels = np.array([1] + [0] * 39)
    probabilities = np.linspace(0.9, 0.0, 40)
    intervals = metrics.bootstrap_ci(labels, probabilities, 0.5, n_bootstrap=200, seed=0)
    assert intervals["sensitivity"] == (1.0, 1.0)
    assert all(np.isfinite(intervals["roc_auc"]))


# ---------------------------------------------------------------------------------------------- #
# evaluate_predictions

BASE_NAMES = ("tp", "fp", "tn", "fn", "prevalence")
SCORED = metrics.RATE_NAMES + metrics.SCORE_NAMES


def expected_keys(with_prevalence: bool) -> set[str]:
    names = SCORED + (("ppv_at_prevalence", "npv_at_prevalence") if with_prevalence else ())
    return set(BASE_NAMES) | {f"{n}{suffix}" for n in names for suffix in ("", "_ci_low", "_ci_high")}


@pytest.mark.parametrize("prevalence", [None, 0.05])
def test_evaluate_predictions_names_and_values(prevalence):
    labels, probabilities, threshold, counts, rates, _ = CONFUSION_CASES["mixed"]
    result = metrics.evaluate_predictions(
        labels, probabilities, threshold, n_bootstrap=50, seed=0, prevalence=prevalence
    )
    assert set(result.metrics) == expected_keys(prevalence is not None)
    assert (result.metrics["tp"], result.metrics["fp"], result.metrics["tn"], result.metrics["fn"]) == (2, 2, 1, 1)
    assert result.metrics["prevalence"] == 0.5
    assert result.metrics["sensitivity"] == pytest.approx(rates["sensitivity"])
    if prevalence is not None:
        # sens 2/3, spec 1/3 at 5 %: (2/3 * .05) / (2/3 * .05 + 2/3 * .95) = 0.05
        assert result.metrics["ppv_at_prevalence"] == pytest.approx(0.05)
    assert all(isinstance(v, float) for v in result.metrics.values())


def test_evaluate_predictions_single_class_gives_nan_with_reasons():
    result = metrics.evaluate_predictions([0, 0, 0, 0], [0.1, 0.6, 0.2, 0.3], 0.5, n_bootstrap=100, seed=0)
    nan_names = {name for name, value in result.metrics.items() if math.isnan(value)}
    assert {"sensitivity", "roc_auc", "pr_auc", "roc_auc_ci_low", "sensitivity_ci_high"} <= nan_names
    assert nan_names == set(result.reasons)  # every NaN explained, nothing else
    assert result.reasons["sensitivity"] == "no positives in the test split"
    assert "ROC AUC needs both classes" in result.reasons["roc_auc"]
    assert result.reasons["roc_auc_ci_low"] == result.reasons["roc_auc"]
    assert result.metrics["specificity"] == 0.75 and not math.isnan(result.metrics["brier"])


def test_evaluate_predictions_without_bootstrap():
    result = metrics.evaluate_predictions([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8], 0.5, n_bootstrap=0, seed=0)
    assert result.metrics["roc_auc"] == 1.0
    assert math.isnan(result.metrics["roc_auc_ci_low"])
    assert result.reasons["roc_auc_ci_low"] == "bootstrap disabled (n_bootstrap=0)"


# ---------------------------------------------------------------------------------------------- #
# Thresholds

THRESHOLD_CASES = {
    # separable: every rule lands on an observed probability
    "separable youden": ([0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.3, 0.7, 0.8, 0.9], "youden", 0.95, 0.7),
    "separable sens>=0.6": ([0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.3, 0.7, 0.8, 0.9], "sensitivity", 0.6, 0.8),
    "separable sens>=1": ([0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.3, 0.7, 0.8, 0.9], "sensitivity", 1.0, 0.7),
    # J = tpr - fpr: thr 0.8 -> .5, 0.6 -> 0, 0.4 -> .5: ties go to the highest threshold
    "youden tie": ([0, 1, 0, 1], [0.2, 0.4, 0.6, 0.8], "youden", 0.95, 0.8),
    "sens>=0.95 overlapping": ([0, 1, 0, 1], [0.2, 0.4, 0.6, 0.8], "sensitivity", 0.95, 0.4),
    # specificity: the most sensitive point still meeting the target
    "separable spec>=0.95": ([0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.3, 0.7, 0.8, 0.9], "specificity", 0.95, 0.7),
    "spec>=0.95 overlapping": ([0, 1, 0, 1], [0.2, 0.4, 0.6, 0.8], "specificity", 0.95, 0.8),
    # thr 0.6 and 0.4 both keep specificity 0.5; 0.4 also catches the second positive
    "spec>=0.5 overlapping": ([0, 1, 0, 1], [0.2, 0.4, 0.6, 0.8], "specificity", 0.5, 0.4),
    # the 0.75 normal is a false positive below 0.75: spec 0.8 allows it (1 of 5), spec 0.9 does not
    "spec>=0.8 one false positive": ([0, 0, 0, 0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4, 0.75, 0.6, 0.9], "specificity", 0.8, 0.6),
    "spec>=0.9 one false positive": ([0, 0, 0, 0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4, 0.75, 0.6, 0.9], "specificity", 0.9, 0.9),
    # a probability of exactly 1.0 is clipped into (0, 1)
    "clipped": ([0, 1], [0.0, 1.0], "youden", 0.95, 1 - 1e-7),
}


@pytest.mark.parametrize("case", THRESHOLD_CASES.values(), ids=THRESHOLD_CASES.keys())
def test_choose_threshold(case):
    labels, probabilities, rule, target, expected = case
    threshold = metrics.choose_threshold(labels, probabilities, rule=rule, target_sensitivity=target,
                                         target_specificity=target)
    assert threshold == pytest.approx(expected, abs=1e-12)
    assert 0 < threshold < 1
    if rule in ("sensitivity", "specificity"):
        achieved = metrics.rates(metrics.confusion(labels, probabilities, threshold))[rule]
        assert achieved >= target


def test_choose_threshold_separates_a_separable_case():
    labels, probabilities = [0, 0, 1, 1], [0.05, 0.3, 0.6, 0.99]
    counts = metrics.confusion(labels, probabilities, metrics.choose_threshold(labels, probabilities, "youden"))
    assert (counts.fp, counts.fn) == (0, 0)


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1]])
def test_choose_threshold_needs_both_classes(labels):
    with pytest.raises(ValueError, match="needs both classes"):
        metrics.choose_threshold(labels, np.linspace(0.1, 0.9, len(labels)), "youden")


@pytest.mark.parametrize(
    "target, expected",
    [
        (1.0, 0.75),  # threshold 0.7: no false positive, 3 of 4 positives
        (0.75, 1.0),  # threshold 0.5: 0.6 is a false positive, all positives found
        (0.0, 1.0),
    ],
)
def test_sensitivity_at_specificity(target, expected):
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    probabilities = [0.1, 0.2, 0.3, 0.6, 0.5, 0.7, 0.8, 0.9]
    assert metrics.sensitivity_at_specificity(labels, probabilities, target) == expected


def test_sensitivity_at_specificity_single_class_is_nan():
    assert math.isnan(metrics.sensitivity_at_specificity([0, 0], [0.2, 0.4], 0.9))


def test_threshold_sweep_rows_and_monotonicity():
    labels, probabilities = synthetic_predictions(500, seed=5)
    sweep = metrics.threshold_sweep(labels, probabilities, np.linspace(0, 1, 51))
    assert list(sweep.columns) == ["threshold", "sensitivity", "specificity", "ppv", "npv"]
    assert len(sweep) == 51
    assert (np.diff(sweep["sensitivity"]) <= 0).all()
    assert (np.diff(sweep["specificity"]) >= 0).all()
    assert sweep["sensitivity"].iloc[0] == 1.0 and sweep["specificity"].iloc[0] == 0.0
    # Row at 0.5 equals the hand-checked rates path.
    expected = metrics.rates(metrics.confusion(labels, probabilities, 0.5))
    row = sweep.loc[np.isclose(sweep["threshold"], 0.5)].iloc[0]
    for name in ("sensitivity", "specificity", "ppv", "npv"):
        assert row[name] == pytest.approx(expected[name])


def test_threshold_sweep_hand_case():
    labels, probabilities, *_ = CONFUSION_CASES["mixed"]
    sweep = metrics.threshold_sweep(labels, probabilities, [0.5, 0.95])
    assert sweep["sensitivity"].tolist() == pytest.approx([2 / 3, 0.0])
    assert math.isnan(sweep["ppv"].iloc[1])  # nothing called positive at 0.95


# --------------------------------------------------------------------------------------------------
# Hanley & McNeil's standard error of an AUC


@pytest.mark.parametrize(
    "auc, n_positive, n_negative, expected",
    [
        # (A(1-A) + (m-1)(A/(2-A) - A^2) + (n-1)(2A^2/(1+A) - A^2)) / (m n), worked by hand
        (0.5, 10, 10, math.sqrt((0.25 + 9 / 12 + 9 / 12) / 100)),
        (0.9, 50, 50, math.sqrt((0.09 + 49 * (0.9 / 1.1 - 0.81) + 49 * (1.62 / 1.9 - 0.81)) / 2500)),
        # unequal classes: the positives' term and the negatives' term are not interchangeable
        (0.9, 31, 89, math.sqrt((0.09 + 30 * (0.9 / 1.1 - 0.81) + 88 * (1.62 / 1.9 - 0.81)) / (31 * 89))),
        (0.9, 89, 31, math.sqrt((0.09 + 88 * (0.9 / 1.1 - 0.81) + 30 * (1.62 / 1.9 - 0.81)) / (31 * 89))),
        (1.0, 30, 90, 0.0),
        (0.0, 30, 90, 0.0),
    ],
)
def test_auc_standard_error_by_hand(auc, n_positive, n_negative, expected):
    assert metrics.auc_standard_error(auc, n_positive, n_negative) == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("auc, n_positive, n_negative", [(0.9, 0, 10), (0.9, 10, 0), (1.2, 10, 10), (-0.1, 10, 10)])
def test_auc_standard_error_refuses_what_has_no_auc(auc, n_positive, n_negative):
    with pytest.raises(ValueError):
        metrics.auc_standard_error(auc, n_positive, n_negative)


@pytest.mark.parametrize(
    "target_auc, n_positive, n_negative, low, high",
    [
        (0.7, 31, 89, 0.95, 1.25),  # the default synthetic validation split (120 images)
        (0.9, 31, 89, 1.05, 1.45),
        (0.9, 314, 886, 1.05, 1.45),  # the pruning benchmark's 1,200-image validation split
    ],
)
def test_auc_standard_error_is_the_sampling_error_or_a_little_above(target_auc, n_positive, n_negative, low, high):
    """Binormal scores: the spread of the AUC over fresh samples against the formula (conservative)."""
    from scipy.stats import norm

    rng = np.random.default_rng(3)
    shift = math.sqrt(2) * norm.ppf(target_auc)  # AUC of N(shift, 1) vs N(0, 1)
    labels = np.r_[np.ones(n_positive), np.zeros(n_negative)]
    aucs = [
        roc_auc_score(labels, np.r_[rng.normal(shift, 1, n_positive), rng.normal(0, 1, n_negative)])
        for _ in range(600)
    ]
    ratio = metrics.auc_standard_error(float(np.mean(aucs)), n_positive, n_negative) / float(np.std(aucs))
    assert low <= ratio <= high


# --------------------------------------------------------------------------------------------------
# Paired differences


def _two_models(n: int = 200, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(n // 2), np.zeros(n - n // 2)].astype(int)
    weak = np.clip(0.5 + 0.15 * (labels - 0.5) + rng.normal(0, 0.25, n), 0, 1)
    strong = np.clip(0.5 + 0.6 * (labels - 0.5) + rng.normal(0, 0.15, n), 0, 1)
    return labels, weak, strong


@pytest.mark.parametrize(
    "name, pick, sign",
    [
        ("the same model twice: exactly zero", lambda w, s: (w, w), 0),
        ("a clearly better B", lambda w, s: (w, s), 1),
        ("a clearly worse B", lambda w, s: (s, w), -1),
    ],
)
def test_paired_difference(name, pick, sign):
    from cxrexp.evaluation.metrics import paired_difference, roc_auc

    labels, weak, strong = _two_models()
    a, b = pick(weak, strong)
    result = paired_difference(labels, a, b, n_bootstrap=500, seed=3)
    assert result.estimate == pytest.approx(roc_auc(labels, b) - roc_auc(labels, a)), name
    assert result.low <= result.estimate <= result.high, name
    if sign == 0:
        assert result.low == result.high == 0.0, name
    elif sign > 0:
        assert result.low > 0, name
    else:
        assert result.high < 0, name
    assert result.n_resamples == 500
    assert paired_difference(labels, a, b, n_bootstrap=500, seed=3) == result, name  # seeded


def test_paired_interval_is_narrower_than_the_unpaired_one():
    """Both models share the case mix's noise; pairing removes it from the difference."""
    from cxrexp.evaluation.metrics import bootstrap_ci, paired_difference

    labels, weak, _ = _two_models(seed=1)
    rng = np.random.default_rng(9)
    similar = np.clip(weak + rng.normal(0, 0.03, weak.size), 0, 1)  # a near-copy of A
    paired = paired_difference(labels, weak, similar, n_bootstrap=500, seed=3)
    low_a, high_a = bootstrap_ci(labels, weak, 0.5, 500, 3)["roc_auc"]
    assert paired.high - paired.low < 0.5 * (high_a - low_a)


def test_paired_difference_of_a_rate_uses_each_models_threshold():
    from cxrexp.evaluation.metrics import paired_difference

    labels = np.array([1, 1, 0, 0])
    probabilities = np.array([0.9, 0.6, 0.4, 0.1])
    result = paired_difference(labels, probabilities, probabilities, "sensitivity", threshold_a=0.5,
                               threshold_b=0.7, n_bootstrap=50)
    assert result.estimate == pytest.approx(-0.5)  # B at 0.7 misses the 0.6 case


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"metric": "lung_focus"}, "not one of"),
        ({"alpha": 0}, "alpha"),
        ({"n_bootstrap": 0}, "n_bootstrap"),
    ],
)
def test_paired_difference_refuses(kwargs, message):
    from cxrexp.evaluation.metrics import paired_difference

    labels, weak, strong = _two_models(20)
    with pytest.raises(ValueError, match=message):
        paired_difference(labels, weak, strong, **kwargs)
    with pytest.raises(ValueError):
        paired_difference(labels, weak, strong[:-1])
