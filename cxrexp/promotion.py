"""The promotion decision: may a challenger model replace the champion? (pure: no MLflow)

The step (``cxrexp/steps/promote_step.py``) gathers the evidence from MLflow (evaluate runs, model
versions), calls ``decide`` and moves the aliases; this module only weighs numbers.

Gates, each reported in plain words whether it passes or fails:

``sensitivity``, ``specificity``, ``roc_auc``
    ``test_<metric>`` (or ``test_<metric>_ci_low`` when ``gate_on_ci_low``, the lower end of the
    bootstrap confidence interval) must be >= its minimum. Equal passes.
``audit``
    when ``require_audit`` (off by default: see ``occlusion``), the evaluate step's shortcut/lung-focus audit must have passed, and with
    a ``min_lung_focus`` and a ``min_lung_focus_lift`` each at least promote's own (default:
    evaluate's defaults): an audit passed at a laxer gate does not count. An unknown result or gate
    (not recorded) fails, since "not checked" is not "fine"; a gate promote sets to 0 is not asked.
``occlusion``
    when ``require_occlusion``, the evaluate run's occlusion check must show that the lungs carry the
    model's ranking: with only the (widened) lung fields shown, the test ROC-AUC may fall against the
    whole view by no more than ``max_lungs_only_loss``, judged on the paired bootstrap interval (its
    lower bound ``occlusion_lungs_only_auc_change_ci_low`` >= ``-max_lungs_only_loss``), a
    non-inferiority test like the champion gate's. The check must have widened the masks by no more
    than ``max_occlusion_margin`` (a wider widening shows more than the lungs: laxer; not recorded fails). This asks whether the model's evidence is in the
    lungs by intervening on the image, where the audit reads heatmaps; the margin, and why this gate and
    not the audit's is the default, were chosen on the validation split with controls (models that see
    only their lungs, models that read whole films), never on a test split (docs/serving.md, "The
    occlusion gate"). Not computed (no real lung masks, one class, a failure) or recorded without an
    interval fails, with the evaluate run's own reason.
``external_occlusion``
    when promote is given external collections (``Gates.external``: their names as evaluate logs them,
    ``external_<name>_occlusion_*``), the same occlusion rule must hold on each: the check on another
    hospital's films is what shows whether the lungs carry the ranking off the model's own database.
    A collection the evaluate run did not score, or scored without occluding, fails. Not asked by
    default (the default lung-cropped models fail it on both external dev pairings: docs/serving.md,
    "The external occlusion gate"); then it passes and shows what each recorded collection would say.
``overlap``
    ``test_overlap_with_training`` (test images whose bytes are in the training data) must be 0: a
    figure measured partly on training images is not a test figure. Not recorded (the training
    dataset was not available to evaluate) passes and says so.
``champion``
    the challenger must be **non-inferior** to the champion on ``primary_metric`` beyond noise: both
    models' per-case test predictions (the same cases: the same prepared dataset) give a paired
    bootstrap interval of the difference challenger - champion (``metrics.paired_difference``), and
    the gate passes only when the whole interval clears the margin: its lower bound above
    ``-margin`` for a higher-is-better metric, its upper bound below ``+margin`` for Brier
    (lower is better). On 120 test images an AUC is known to about +-0.04, so comparing two point
    estimates with a 0.01 margin follows noise; the paired interval is far narrower, because the
    case mix's noise is shared by both models. A metric whose direction is unknown fails the gate
    (``METRIC_DIRECTIONS``). Without per-case predictions for both (evaluate runs logged before
    ``predictions.csv`` existed) the gate falls back to the point estimates,
    ``challenger >= champion - margin`` (``TIE_TOLERANCE`` absorbs float rounding), and says so.
    The figures are only comparable when both were measured on the same prepared dataset
    (``dataset_digest``); otherwise the gate fails and says so (the step evaluates the champion on
    the challenger's dataset first, so this is a safety net). With no champion the gate passes: the
    decision then rests on the other gates alone. A negative ``margin`` demands a strict improvement
    of at least ``-margin``.

A metric that is missing or NaN (undefined, e.g. no positives in the test split) fails its gate with
that reason: an undefined figure never lets a model through.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from cxrexp.config import PromoteConfig
from cxrexp.evaluation.external import EXTERNAL_PREFIX, collection_names
from cxrexp.evaluation.metrics import RATE_NAMES, paired_difference
from cxrexp.evaluation.occlusion import N_METRIC as OCCLUSION_N_METRIC
from cxrexp.evaluation.occlusion import change_metric

# Gate names, in the order they are reported. They become tag keys (``promotion.<gate>``).
THRESHOLD_GATES = ("sensitivity", "specificity", "roc_auc")
AUDIT_GATE = "audit"
OCCLUSION_GATE = "occlusion"
EXTERNAL_OCCLUSION_GATE = "external_occlusion"
OVERLAP_GATE = "overlap"
CHAMPION_GATE = "champion"
GATE_NAMES = (*THRESHOLD_GATES, AUDIT_GATE, OCCLUSION_GATE, EXTERNAL_OCCLUSION_GATE, OVERLAP_GATE, CHAMPION_GATE)
OVERLAP_METRIC = "test_overlap_with_training"

METRIC_PREFIX = "test_"
CI_LOW_SUFFIX = "_ci_low"
# Absorbs float rounding in "champion - margin" so that a tie as written by a person passes.
TIE_TOLERANCE = 1e-9
# +1: higher is better; -1: lower is better. A primary metric not listed here cannot be compared.
METRIC_DIRECTIONS = {
    **{f"{METRIC_PREFIX}{name}": 1 for name in (*RATE_NAMES, "roc_auc", "pr_auc")},
    f"{METRIC_PREFIX}brier": -1,
}


@dataclass(frozen=True)
class Gates:
    """What a challenger must show. Thresholds are rates/AUCs in [0, 1]; ``margin`` in metric units."""

    # Defaults are the promote step's (one source of truth: the config the flags come from).
    min_sensitivity: float = PromoteConfig.min_sensitivity
    min_specificity: float = PromoteConfig.min_specificity
    min_roc_auc: float = PromoteConfig.min_roc_auc
    gate_on_ci_low: bool = PromoteConfig.gate_on_ci_low
    primary_metric: str = PromoteConfig.primary_metric
    margin: float = PromoteConfig.margin
    require_audit: bool = PromoteConfig.require_audit
    min_lung_focus: float = PromoteConfig.min_lung_focus
    min_lung_focus_lift: float = PromoteConfig.min_lung_focus_lift
    require_occlusion: bool = PromoteConfig.require_occlusion
    max_lungs_only_loss: float = PromoteConfig.max_lungs_only_loss
    max_occlusion_margin: float = PromoteConfig.max_occlusion_margin
    # Names of the external collections (``external.collection_names`` of promote's -P external folders)
    # whose occlusion check must pass too; () asks nothing of them.
    external: tuple[str, ...] = ()
    n_bootstrap: int = PromoteConfig.n_bootstrap
    seed: int = PromoteConfig.seed

    def __post_init__(self) -> None:
        for name in ("min_sensitivity", "min_specificity", "min_roc_auc", "min_lung_focus"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= float(value) <= 1.0):
                raise ValueError(f"{name}={value!r} must be a number in [0, 1]")
        lift = self.min_lung_focus_lift
        if not (isinstance(lift, (int, float)) and math.isfinite(lift) and lift >= 0):
            raise ValueError(f"min_lung_focus_lift={lift!r} must be a finite number >= 0")
        loss = self.max_lungs_only_loss
        if not (isinstance(loss, (int, float)) and math.isfinite(loss) and 0 <= loss < 1):
            raise ValueError(f"max_lungs_only_loss={loss!r} must be a number in [0, 1) (ROC-AUC units, e.g. 0.08)")
        widest = self.max_occlusion_margin
        if not (isinstance(widest, (int, float)) and math.isfinite(widest) and 0 <= widest < 0.5):
            raise ValueError(f"max_occlusion_margin={widest!r} must be a number in [0, 0.5) (a share of the image side)")
        if not (isinstance(self.margin, (int, float)) and math.isfinite(self.margin) and abs(self.margin) < 1):
            raise ValueError(f"margin={self.margin!r} must be a finite number in (-1, 1), e.g. 0.01")
        if not self.primary_metric or not isinstance(self.primary_metric, str):
            raise ValueError(f"primary_metric={self.primary_metric!r}: give a metric name such as test_roc_auc")
        if not (isinstance(self.n_bootstrap, int) and self.n_bootstrap >= 100):
            raise ValueError(f"n_bootstrap={self.n_bootstrap!r} must be at least 100 resamples (default 2000)")

    @classmethod
    def from_config(cls, cfg: Any) -> Gates:
        """The gate fields of a ``PromoteConfig`` (or anything with the same attribute names)."""
        return cls(
            min_sensitivity=float(cfg.min_sensitivity),
            min_specificity=float(cfg.min_specificity),
            min_roc_auc=float(cfg.min_roc_auc),
            gate_on_ci_low=bool(cfg.gate_on_ci_low),
            primary_metric=str(cfg.primary_metric),
            margin=float(cfg.margin),
            require_audit=bool(cfg.require_audit),
            min_lung_focus=float(cfg.min_lung_focus),
            min_lung_focus_lift=float(cfg.min_lung_focus_lift),
            require_occlusion=bool(cfg.require_occlusion),
            max_lungs_only_loss=float(cfg.max_lungs_only_loss),
            max_occlusion_margin=float(cfg.max_occlusion_margin),
            external=tuple(collection_names(cfg.external)),
            n_bootstrap=int(cfg.n_bootstrap),
            seed=int(cfg.seed),
        )

    def minimum(self, gate: str) -> float:
        return float(getattr(self, f"min_{gate}"))


@dataclass(frozen=True)
class CasePredictions:
    """One model's per-case test predictions (the evaluate run's ``predictions.csv``)."""

    sources: tuple[str, ...]
    labels: tuple[int, ...]
    probabilities: tuple[float, ...]
    threshold: float = 0.5


@dataclass(frozen=True)
class Evidence:
    """One model version's test figures, as one evaluate run recorded them.

    ``metrics``: metric name -> float (``test_sensitivity``, ``test_sensitivity_ci_low``, ...; NaN
    allowed). ``audit_passed``: True/False, or None when no audit result was recorded.
    ``dataset_digest``: the prepared dataset the figures come from (None when unknown).
    ``predictions``: the per-case test predictions, for the paired champion comparison (None: unknown).
    ``audit_min_lung_focus`` / ``audit_min_lung_focus_lift``: the gates the evaluate run's audit was
    judged at (None: not recorded). ``occlusion_note``: the evaluate run's word on its occlusion check
    ("computed on N cases" or why not; None: not recorded); ``occlusion_margin``: the mask widening
    that check used (its param; None: not recorded).
    """

    version: str
    metrics: Mapping[str, float] = field(default_factory=dict)
    audit_passed: bool | None = None
    dataset_digest: str | None = None
    predictions: CasePredictions | None = None
    audit_min_lung_focus: float | None = None
    audit_min_lung_focus_lift: float | None = None
    occlusion_note: str | None = None
    occlusion_margin: float | None = None


@dataclass(frozen=True)
class GateCheck:
    """One gate's outcome: ``value`` measured, ``limit`` it was held to (None where not numeric)."""

    gate: str
    passed: bool
    value: float | None
    limit: float | None
    reason: str
    detail: Mapping[str, Any] = field(default_factory=dict)  # extra figures for decision.json


@dataclass(frozen=True)
class Decision:
    """``promote`` is True only when every gate passed.

    ``reasons``: one plain sentence per gate (``GATE_NAMES`` order), starting with ``pass`` or
    ``FAIL``. ``gate_values``: gate -> {"passed": bool, "value": float|None, "limit": float|None}.
    """

    promote: bool
    reasons: list[str]
    gate_values: dict[str, dict[str, Any]]
    checks: tuple[GateCheck, ...] = ()

    @property
    def failed_gates(self) -> list[str]:
        return [check.gate for check in self.checks if not check.passed]

    @property
    def verdict(self) -> str:
        return "promote" if self.promote else "keep the champion"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN becomes None, since JSON has no NaN)."""

        def clean(value: Any) -> Any:
            if isinstance(value, float) and not math.isfinite(value):
                return None
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            return value

        return {
            "promote": self.promote,
            "verdict": self.verdict,
            "failed_gates": self.failed_gates,
            "reasons": list(self.reasons),
            "gates": clean(self.gate_values),
        }


def _fmt(value: float | None) -> str:
    if value is None:
        return "missing"
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    return f"{value:.4f}"


def _metric(metrics: Mapping[str, float], key: str) -> float | None:
    """The metric as a float; None when absent (NaN is kept: it is a recorded, undefined figure)."""
    if key not in metrics or metrics[key] is None:
        return None
    try:
        return float(metrics[key])
    except (TypeError, ValueError):
        return float("nan")


def _undefined(value: float | None) -> bool:
    return value is None or math.isnan(value) or math.isinf(value)


def _threshold_check(gate: str, challenger: Evidence, gates: Gates) -> GateCheck:
    key = f"{METRIC_PREFIX}{gate}{CI_LOW_SUFFIX if gates.gate_on_ci_low else ''}"
    what = f"{key} (lower end of the confidence interval)" if gates.gate_on_ci_low else key
    limit = gates.minimum(gate)
    value = _metric(challenger.metrics, key)
    if value is None:
        return GateCheck(gate, False, None, limit, f"FAIL {gate}: {key} was not recorded by the evaluate run")
    if _undefined(value):
        return GateCheck(
            gate, False, value, limit,
            f"FAIL {gate}: {what} is {_fmt(value)} (undefined, e.g. a class missing from the test split)",
        )
    passed = value >= limit
    word, sign = ("pass", ">=") if passed else ("FAIL", "<")
    return GateCheck(gate, passed, value, limit, f"{word} {gate}: {what} = {_fmt(value)} {sign} minimum {_fmt(limit)}")


def _audit_check(challenger: Evidence, gates: Gates) -> GateCheck:
    known = challenger.audit_passed
    value = None if known is None else float(bool(known))
    if not gates.require_audit:
        result = {None: "unknown", True: "passed", False: "failed"}[known]
        return GateCheck(AUDIT_GATE, True, value, None, f"pass audit: not required (its result: {result})")
    if known is None:
        return GateCheck(
            AUDIT_GATE, False, None, 1.0,
            "FAIL audit: no audit result recorded for this version (run evaluate, or set require_audit=false)",
        )
    for name, ran_at, ours in (("min_lung_focus", challenger.audit_min_lung_focus, gates.min_lung_focus),
                               ("min_lung_focus_lift", challenger.audit_min_lung_focus_lift, gates.min_lung_focus_lift)):
        if ours <= 0:  # promote asks nothing of this gate: how strictly the audit was judged does not matter
            continue
        if ran_at is None or _undefined(ran_at):
            return GateCheck(
                AUDIT_GATE, False, value, 1.0,
                f"FAIL audit: the evaluate run does not record the {name} its audit was judged at "
                "(evaluate again with this release)",
            )
        if ran_at < ours - TIE_TOLERANCE:
            return GateCheck(
                AUDIT_GATE, False, value, 1.0,
                f"FAIL audit: the audit was judged at {name} {ran_at:g}, laxer than promote's "
                f"{ours:g}: evaluate again with -P {name}={ours:g} or more",
            )
    if known:
        return GateCheck(AUDIT_GATE, True, 1.0, 1.0, "pass audit: the shortcut/lung-focus audit passed")
    return GateCheck(
        AUDIT_GATE, False, 0.0, 1.0,
        "FAIL audit: the shortcut/lung-focus audit failed (the model may look outside the lungs)",
    )


def _signed(value: float | None) -> str:
    return _fmt(value) if _undefined(value) else f"{value:+.4f}"


@dataclass(frozen=True)
class _OcclusionVerdict:
    """The occlusion rule's outcome on one set of cases, without the gate's name (the internal gate
    and the external one word it each their own way)."""

    passed: bool
    value: float | None
    text: str
    detail: Mapping[str, Any]


def _occlusion_verdict(metrics: Mapping[str, float], note: str | None, margin: float | None, gates: Gates, *,
                       cases: str, switch_off: str) -> _OcclusionVerdict:
    """The occlusion rule on ``metrics`` named as the internal test split's (``occlusion_n``,
    ``occlusion_lungs_only_auc_change``...); ``note`` the evaluate run's reason when not computed,
    ``margin`` the mask widening it used; ``cases`` names the images ("test"), ``switch_off`` how the
    user stops asking."""
    n = _metric(metrics, OCCLUSION_N_METRIC)
    estimate = _metric(metrics, change_metric("lungs_only"))
    low = _metric(metrics, change_metric("lungs_only", "ci_low"))
    high = _metric(metrics, change_metric("lungs_only", "ci_high"))
    loss = f"{gates.max_lungs_only_loss:g}"
    limit = -gates.max_lungs_only_loss
    detail = {"lungs_only_auc_change": estimate, "lungs_only_auc_change_ci_low": low,
              "lungs_only_auc_change_ci_high": high, "n_cases": n, "occlusion_margin": margin}
    if n is None:
        return _OcclusionVerdict(False, None, "the evaluate run recorded no occlusion check (evaluate again with "
                                 f"this release, or {switch_off})", detail)
    if _undefined(n) or n <= 0:
        return _OcclusionVerdict(False, None, f"the occlusion check was not computed ({note or 'no reason recorded'}); "
                                 f"it needs real lung masks for {cases} images of both classes (the dataset's, or a "
                                 f"segmenter's: evaluate -P audit_lung_model=...), or {switch_off}", detail)
    # A wider widening shows the model more than the lungs, which is laxer (as an audit judged at a laxer gate).
    if margin is None or _undefined(margin) or margin > gates.max_occlusion_margin + TIE_TOLERANCE:
        shown = "does not record its mask widening (occlusion_margin)" if margin is None or _undefined(margin) else (
            f"widened the lung masks by {margin:g} of the side, more than promote's max_occlusion_margin "
            f"{gates.max_occlusion_margin:g}: its lungs-only view showed more than the lungs")
        return _OcclusionVerdict(False, low, f"the evaluate run {shown}; evaluate again with -P occlusion_margin <= "
                                 f"{gates.max_occlusion_margin:g}, or raise promote's --max-occlusion-margin for a "
                                 "lung view cut with a wider lung_margin", detail)
    if _undefined(low) or _undefined(high):
        return _OcclusionVerdict(False, estimate, f"the lungs-only ROC-AUC change ({_signed(estimate)}) has no "
                                 "interval (evaluate ran with n_bootstrap 0 or the resamples were undefined): "
                                 "evaluate again with bootstrap resamples", detail)
    assert low is not None and high is not None
    figure = (f"with only the lungs shown, {cases} ROC-AUC changes by {_signed(estimate)} [{low:+.4f}, {high:+.4f}] "
              f"(paired 95% interval, {int(n)} cases)")
    if low >= limit - TIE_TOLERANCE:
        return _OcclusionVerdict(True, low, f"{figure}; the lower bound is at or above -{loss}: the lungs carry "
                                 "the ranking", detail)
    return _OcclusionVerdict(False, low, f"{figure}; the lower bound {low:+.4f} is below -{loss}: not shown that "
                             "the lungs carry the ranking (the model may use what lies outside them)", detail)


def occlusion_gate(challenger: Evidence, gates: Gates) -> GateCheck:
    """The ``occlusion`` gate alone, on the test split (``decide`` runs it with the others; evaluate runs it
    to tell the reader, before any promote, what promote's default gate will say of the test split;
    ``external_occlusion_gate`` says it of each external collection)."""
    limit = -gates.max_lungs_only_loss
    verdict = _occlusion_verdict(challenger.metrics, challenger.occlusion_note, challenger.occlusion_margin, gates,
                                 cases="test", switch_off="set require_occlusion=false")
    if not gates.require_occlusion:
        low = verdict.detail["lungs_only_auc_change_ci_low"]
        shown = "not recorded" if low is None else f"lower bound {_signed(low)}"
        return GateCheck(OCCLUSION_GATE, True, low, None, f"pass occlusion: not required (its lungs-only change: {shown})",
                         verdict.detail)
    word = "pass" if verdict.passed else "FAIL"
    return GateCheck(OCCLUSION_GATE, verdict.passed, verdict.value, limit,
                     f"{word} occlusion: {verdict.text}",
                     verdict.detail)


def external_collections(metrics: Mapping[str, float]) -> list[str]:
    """Names of the external collections whose occlusion check an evaluate run recorded (its
    ``external_<name>_occlusion_n`` metrics), sorted."""
    suffix = f"_{OCCLUSION_N_METRIC}"
    return sorted(key[len(EXTERNAL_PREFIX):-len(suffix)] for key in metrics
                  if key.startswith(EXTERNAL_PREFIX) and key.endswith(suffix) and len(key) > len(EXTERNAL_PREFIX) + len(suffix))


def external_metrics(metrics: Mapping[str, float], name: str) -> dict[str, float]:
    """Collection ``name``'s metrics under the internal names (``external_<name>_occlusion_n`` ->
    ``occlusion_n``), for the rules written for the test split."""
    prefix = f"{EXTERNAL_PREFIX}{name}_"
    return {key[len(prefix):]: value for key, value in metrics.items() if key.startswith(prefix)}


def external_occlusion_gate(challenger: Evidence, gates: Gates) -> GateCheck:
    """The ``external_occlusion`` gate: the occlusion rule (``max_lungs_only_loss``, ``max_occlusion_margin``)
    on each collection named in ``gates.external``, as the evaluate run scored it; passes when every one
    passes. With none named it passes and shows what the recorded collections would say."""
    limit = -gates.max_lungs_only_loss
    recorded = external_collections(challenger.metrics)
    verdicts = {name: _occlusion_verdict(external_metrics(challenger.metrics, name),
                                         f"external {name}: see the evaluate run's log", challenger.occlusion_margin,
                                         gates, cases="its", switch_off=f"leave {name} out of promote's -P external")
                for name in (gates.external or recorded) if name in recorded}
    detail = {f"{name}_lungs_only_auc_change_ci_low": v.detail["lungs_only_auc_change_ci_low"]
              for name, v in verdicts.items()}
    if not gates.external:
        shown = "; ".join(f"{name} {'passes' if v.passed else 'fails'}" for name, v in verdicts.items())
        return GateCheck(EXTERNAL_OCCLUSION_GATE, True, None, None,
                         "pass external_occlusion: not required (no -P external given"
                         + (f"; the evaluate run's external collections at this rule: {shown})" if shown else ")"),
                         detail)
    missing = [name for name in gates.external if name not in recorded]
    if missing:
        return GateCheck(EXTERNAL_OCCLUSION_GATE, False, None, limit,
                         f"FAIL external_occlusion: the evaluate run recorded no occlusion check of {', '.join(missing)} "
                         f"(it has: {', '.join(recorded) or 'none'}); evaluate with -P external=<the collections' "
                         "folders>, or leave them out of promote's -P external", detail)
    values = [v.value for v in verdicts.values()]
    value = None if any(_undefined(v) for v in values) else min(values)  # type: ignore[type-var]
    passed = all(v.passed for v in verdicts.values())
    texts = "; ".join(f"{name}: {'' if v.passed else 'FAILS: '}{v.text}" for name, v in verdicts.items())
    return GateCheck(EXTERNAL_OCCLUSION_GATE, passed, value, limit,
                     f"{'pass' if passed else 'FAIL'} external_occlusion: {texts}", detail)


def paired_cases(challenger: CasePredictions, champion: CasePredictions) -> tuple[np.ndarray, np.ndarray, np.ndarray] | str:
    """(labels, champion probabilities, challenger probabilities) on the cases both scored, in one
    order; or the reason they cannot be paired."""
    theirs = {s: (lab, p) for s, lab, p in zip(champion.sources, champion.labels, champion.probabilities)}
    shared = [s for s in challenger.sources if s in theirs]
    if len(shared) != len(challenger.sources) or len(shared) != len(theirs):
        return (f"the two evaluations scored different cases ({len(challenger.sources)} and {len(theirs)}, "
                f"{len(shared)} shared)")
    mine = {s: (lab, p) for s, lab, p in zip(challenger.sources, challenger.labels, challenger.probabilities)}
    if any(mine[s][0] != theirs[s][0] for s in shared):
        return "the two evaluations disagree on some cases' labels"
    labels = np.array([mine[s][0] for s in shared], dtype=np.int64)
    return labels, np.array([theirs[s][1] for s in shared]), np.array([mine[s][1] for s in shared])


def _overlap_check(challenger: Evidence) -> GateCheck:
    value = _metric(challenger.metrics, OVERLAP_METRIC)
    if value is None:
        return GateCheck(OVERLAP_GATE, True, None, 0.0,
                         f"pass overlap: {OVERLAP_METRIC} not recorded (the training dataset was not available "
                         "to the evaluation), so it could not be checked")
    if _undefined(value) or value > 0:
        return GateCheck(OVERLAP_GATE, False, value, 0.0,
                         f"FAIL overlap: {OVERLAP_METRIC} = {_fmt(value)}: the test figures are partly measured "
                         "on images the model was trained on; prepare the data again (its split keeps "
                         "duplicates together) or evaluate on other data")
    return GateCheck(OVERLAP_GATE, True, value, 0.0,
                     f"pass overlap: no test image is in the training data ({OVERLAP_METRIC} = 0)")


def _champion_check(challenger: Evidence, champion: Evidence | None, gates: Gates) -> GateCheck:
    key = gates.primary_metric
    if champion is None:
        return GateCheck(CHAMPION_GATE, True, None, None, "pass champion: there is no champion yet, nothing to compare with")
    direction = METRIC_DIRECTIONS.get(key)
    if direction is None:
        return GateCheck(
            CHAMPION_GATE, False, None, None,
            f"FAIL champion: cannot compare on {key}: whether higher or lower is better is not known for it "
            f"(known: {', '.join(sorted(METRIC_DIRECTIONS))})",
        )
    if challenger.dataset_digest is None or challenger.dataset_digest != champion.dataset_digest:
        return GateCheck(
            CHAMPION_GATE, False, None, None,
            f"FAIL champion: not comparable: the challenger (version {challenger.version}) was evaluated on "
            f"dataset {challenger.dataset_digest}, the champion (version {champion.version}) on "
            f"{champion.dataset_digest}; evaluate both on the same dataset",
        )
    mine = _metric(challenger.metrics, key)
    theirs = _metric(champion.metrics, key)
    for who, value, version in (("challenger", mine, challenger.version), ("champion", theirs, champion.version)):
        if _undefined(value):
            state = "was not recorded" if value is None else f"is {_fmt(value)} (undefined)"
            return GateCheck(
                CHAMPION_GATE, False, mine, theirs,
                f"FAIL champion: cannot compare, the {who}'s (version {version}) {key} {state}",
            )
    assert mine is not None and theirs is not None
    better = "higher" if direction > 0 else "lower"
    if challenger.predictions is not None and champion.predictions is not None:
        cases = paired_cases(challenger.predictions, champion.predictions)
        if isinstance(cases, str):
            return GateCheck(CHAMPION_GATE, False, mine, theirs,
                             f"FAIL champion: cannot pair the test cases: {cases}; evaluate both on the same dataset")
        labels, champion_p, challenger_p = cases
        d = paired_difference(labels, champion_p, challenger_p, key.removeprefix(METRIC_PREFIX),
                              threshold_a=champion.predictions.threshold, threshold_b=challenger.predictions.threshold,
                              n_bootstrap=gates.n_bootstrap, seed=gates.seed)
        detail = {"difference": d.estimate, "difference_ci_low": d.low, "difference_ci_high": d.high,
                  "n_cases": int(labels.size), "n_resamples": d.n_resamples, "comparison": "paired bootstrap"}
        if d.n_resamples == 0:
            return GateCheck(CHAMPION_GATE, False, d.estimate, -gates.margin,
                             f"FAIL champion: the paired difference of {key} is undefined in every resample "
                             "(a class missing from the test split)", detail)
        bound, limit = (d.low, -gates.margin) if direction > 0 else (d.high, gates.margin)
        passed = bound > limit if direction > 0 else bound < limit
        word = "pass" if passed else "FAIL"
        side = "lower" if direction > 0 else "upper"
        relation = ("non-inferior: the whole interval clears" if passed
                    else "not shown non-inferior: the interval reaches past")
        return GateCheck(
            CHAMPION_GATE, passed, d.estimate, limit,
            f"{word} champion: {key} challenger - champion (version {champion.version}) = {d.estimate:+.4f}, "
            f"paired 95% interval [{d.low:+.4f}, {d.high:+.4f}] over {labels.size} shared test cases "
            f"({better} is better); {relation} the margin ({side} bound {bound:+.4f} vs {limit:+.4f})",
            detail,
        )
    floor = theirs - direction * gates.margin
    passed = (mine >= floor - TIE_TOLERANCE) if direction > 0 else (mine <= floor + TIE_TOLERANCE)
    difference = mine - theirs
    word = "pass" if passed else "FAIL"
    relation = "not worse than" if passed else "worse than"
    return GateCheck(
        CHAMPION_GATE, passed, mine, theirs,
        f"{word} champion: {key} {_fmt(mine)} vs champion version {champion.version}'s {_fmt(theirs)} "
        f"(difference {difference:+.4f}, {better} is better): {relation} the champion by more than the margin "
        f"{gates.margin:g} (point estimates: no per-case predictions to pair)",
        {"difference": difference, "comparison": "point estimates"},
    )


def decide(challenger: Evidence, champion: Evidence | None, gates: Gates) -> Decision:
    """Weigh the challenger against the gates and the champion; every gate is checked and reported."""
    checks = (
        *(_threshold_check(gate, challenger, gates) for gate in THRESHOLD_GATES),
        _audit_check(challenger, gates),
        occlusion_gate(challenger, gates),
        external_occlusion_gate(challenger, gates),
        _overlap_check(challenger),
        _champion_check(challenger, champion, gates),
    )
    return Decision(
        promote=all(check.passed for check in checks),
        reasons=[check.reason for check in checks],
        gate_values={
            check.gate: {"passed": check.passed, "value": check.value, "limit": check.limit, **check.detail}
            for check in checks
        },
        checks=checks,
    )


def segmenter_champion(test_dice: float, split_digest: str, champion_dice: float | None,
                       champion_split: str | None) -> tuple[bool, str]:
    """Should a new lung segmenter become ``@champion``? (move, the reason in plain words).

    Yes when there is no champion, or the champion was scored on the same held-out split and the new
    model's test Dice is no worse; a champion scored on another split is not comparable (no move).
    """
    if champion_dice is None:
        return True, f"@champion: there was none; this model has test Dice {test_dice:.4f}"
    if champion_split != split_digest:
        return False, (f"@champion stays: it was scored on another held-out split ({champion_split}, this one "
                       f"{split_digest}); evaluate both on one split to compare")
    if test_dice >= champion_dice:
        return True, f"@champion moved: test Dice {test_dice:.4f} >= the champion's {champion_dice:.4f} on the same split"
    return False, f"@champion stays: test Dice {test_dice:.4f} < the champion's {champion_dice:.4f} on the same split"


__all__ = [
    "segmenter_champion",
    "AUDIT_GATE",
    "CHAMPION_GATE",
    "OCCLUSION_GATE",
    "OVERLAP_GATE",
    "GATE_NAMES",
    "THRESHOLD_GATES",
    "METRIC_DIRECTIONS",
    "TIE_TOLERANCE",
    "CasePredictions",
    "Decision",
    "Evidence",
    "GateCheck",
    "Gates",
    "EXTERNAL_OCCLUSION_GATE",
    "decide",
    "external_collections",
    "external_metrics",
    "external_occlusion_gate",
    "occlusion_gate",
    "paired_cases",
]
