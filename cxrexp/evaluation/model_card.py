"""The evaluation report: one self-contained HTML model card built from values and PNG bytes.

Pure: no MLflow, no file writes. The evaluate step gathers the values, renders the figures to PNG
bytes and logs the string this module returns as ``report.html``. Everything the page needs is in
the one file (figures as base64 ``data:`` URIs, CSS in a ``<style>`` element, no script), so it can
be mailed, archived or opened from the MLflow artifact view without a network.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

from cxrexp.evaluation.occlusion import N_METRIC, VIEW_LABELS, OcclusionResult, auc_metric, occlusion_metrics

# (metric key without the test_ prefix, label shown in the table). Counts first, then the rates with
# their confidence intervals, then the threshold-free scores.
COUNT_ROWS = (
    ("tp", "True positives (TP)"),
    ("fp", "False positives (FP)"),
    ("tn", "True negatives (TN)"),
    ("fn", "False negatives (FN)"),
)
RATE_ROWS = (
    ("prevalence", "Prevalence in the test split"),
    ("sensitivity", "Sensitivity (recall, TPR)"),
    ("specificity", "Specificity (TNR)"),
    ("ppv", "PPV (precision)"),
    ("npv", "NPV"),
    ("accuracy", "Accuracy"),
    ("f1", "F1"),
    ("roc_auc", "ROC AUC"),
    ("pr_auc", "PR AUC (average precision)"),
    ("brier", "Brier score (lower is better)"),
    ("ppv_at_prevalence", "PPV at the stated prevalence"),
    ("npv_at_prevalence", "NPV at the stated prevalence"),
)

INTENDED_USE = (
    "Research and teaching only: exploring how a convolutional network separates COVID-19 from "
    "normal chest X-rays and how its evidence can be inspected. It is not a medical device, has no "
    "regulatory clearance and must not be used to diagnose, triage or treat anyone."
)
LIMITATIONS = (
    "Shortcut learning: public COVID-19 X-ray collections mix hospitals, scanners, ages and image "
    "processing, and positives and negatives often come from different sources. A network can score "
    "well by recognising the source (burnt-in labels, markers, borders, exposure) instead of the "
    "disease. The Grad-CAM audit below is a coarse check for this, not a proof of the opposite.",
    "Unless the test data below is an independent collection, these figures come from a held-out "
    "split of the collection the model was trained on. They say nothing about other hospitals, "
    "populations or devices: external validation on independently collected data is needed before "
    "any claim about real-world performance.",
    "Predictive values depend on prevalence: the PPV and NPV measured here hold only at the test "
    "split's prevalence (see the PPV at a stated prevalence when one was given).",
    "Confidence intervals are percentile bootstrap intervals over test cases; they ignore patient "
    "clustering beyond the duplicate-aware split and the uncertainty of the chosen threshold.",
)


@dataclass(frozen=True)
class Figure:
    """One figure of the report: a title, PNG bytes and an optional caption."""

    title: str
    png: bytes
    caption: str = ""


@dataclass(frozen=True)
class AuditSummary:
    """The shortcut-audit verdict as shown on the card (values as logged; NaN when undefined)."""

    passed: bool
    reason: str
    lung_focus_mean: float
    lung_focus_median: float
    border_share_mean: float
    n: int
    min_lung_focus: float
    mask_source: str = ""
    method: str = (
        "Lung focus is the share of each heatmap's mass that falls inside the lung mask; a model that "
        "reads the lungs keeps most of it there, one that reads burnt-in text or borders does not."
    )
    lung_focus_lift_mean: float = float("nan")
    min_lung_focus_lift: float = 0.0  # 0: the lift was not gated


@dataclass(frozen=True)
class ModelCard:
    """Everything the HTML model card shows.

    ``metrics`` / ``reasons``: ``metrics.Evaluation.metrics`` and ``.reasons`` (names without the
    ``test_`` prefix; ``<name>_ci_low`` / ``<name>_ci_high`` for the intervals). ``details``: extra
    (label, value) lines for the provenance table, shown in order.
    """

    model_uri: str
    evaluate_run_id: str
    train_run_id: str
    data_source: str
    dataset_digest: str
    threshold: float
    threshold_source: str
    metrics: Mapping[str, float]
    reasons: Mapping[str, str] = field(default_factory=dict)
    model_version: str = ""
    model_id: str = ""
    training_digest: str = ""
    positive_label: str = "COVID"
    negative_label: str = "Normal"
    n_test: int = 0
    details: Sequence[tuple[str, str]] = ()
    figures: Sequence[Figure] = ()
    gradcam: Figure | None = None
    audit: AuditSummary | None = None
    notes: Sequence[str] = ()
    title: str = "cxrexp model card"
    # (name, folder, n, n_positive, n_dropped, metrics) per external collection, and warnings in words.
    external: Sequence[tuple[str, str, int, int, int, Mapping[str, float]]] = ()
    external_warnings: Sequence[str] = ()
    occlusion: OcclusionResult | None = None  # None: not run, or failed (occlusion_note says why)
    occlusion_note: str = ""  # where its lung masks came from, or why the check failed
    occlusion_figure: Figure | None = None  # the views of one case of each class
    # What promote's occlusion gate, at its defaults, says of the test split and each external collection.
    occlusion_gate: Sequence[str] = ()


# --------------------------------------------------------------------------------------------------
# Formatting helpers (pure, tested)


def _is_missing(value: float | None) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def format_number(value: float | None, digits: int = 3) -> str:
    """``0.91234`` -> ``"0.912"``, ``1.0`` -> ``"1.000"``; NaN/None -> ``"undefined"``."""
    if _is_missing(value):
        return "undefined"
    value = float(value)
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}f}"


def format_count(value: float | None) -> str:
    """``8.0`` -> ``"8"``; NaN/None -> ``"undefined"``."""
    if _is_missing(value) or math.isinf(float(value)):
        return format_number(value)
    return str(int(round(float(value))))


@dataclass(frozen=True)
class MetricRow:
    """One row of the metrics table: what the reader sees, already formatted."""

    key: str
    label: str
    value: str
    interval: str
    note: str


def metric_rows(metrics: Mapping[str, float], reasons: Mapping[str, str]) -> list[MetricRow]:
    """The metrics table: counts, then every rate/score present in ``metrics`` with its 95 % CI.

    A NaN value shows ``undefined`` with its reason in the note column; a NaN interval around a
    defined value shows ``n/a`` and the interval's reason. Metrics absent from ``metrics`` (e.g.
    ``ppv_at_prevalence`` without a prevalence) are left out.
    """
    rows: list[MetricRow] = []
    for key, label in COUNT_ROWS:
        if key in metrics:
            rows.append(MetricRow(key, label, format_count(metrics[key]), "", ""))
    for key, label in RATE_ROWS:
        if key not in metrics:
            continue
        value = metrics[key]
        low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
        note = reasons.get(key, "") if _is_missing(value) else ""
        if low is None and high is None:
            interval = ""
        elif _is_missing(low) or _is_missing(high):
            interval = "n/a"
            if not note:
                note = reasons.get(f"{key}_ci_low", "") or reasons.get(f"{key}_ci_high", "")
        else:
            interval = f"{format_number(low)} – {format_number(high)}"
        rows.append(MetricRow(key, label, format_number(value), interval, note))
    return rows


def png_data_uri(png: bytes) -> str:
    """PNG bytes -> ``data:image/png;base64,...``; ValueError when the bytes are not a PNG."""
    if not png.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError(f"not PNG data (starts with {png[:8]!r}); render the figure with format='png'")
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# --------------------------------------------------------------------------------------------------
# HTML

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto;
       max-width: 1100px; padding: 0 1rem; color: #1d2430; line-height: 1.45; }
h1 { margin-bottom: 0.2rem; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: 0.2rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #d0d7de; padding: 0.3rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f3f5f7; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { background: #f3f5f7; padding: 0 0.2rem; border-radius: 3px; word-break: break-all; }
.warning { background: #fff4e5; border-left: 4px solid #e8890c; padding: 0.6rem 1rem; }
.verdict { font-weight: bold; padding: 0.6rem 1rem; border-radius: 4px; }
.passed { background: #e6f4ea; border-left: 4px solid #1e8e3e; }
.failed { background: #fce8e6; border-left: 4px solid #d93025; }
.undefined { color: #9a6700; }
figure { display: inline-block; margin: 0.5rem; vertical-align: top; max-width: 100%; }
figure img { max-width: 100%; border: 1px solid #d0d7de; }
figcaption { font-size: 0.9rem; color: #57606a; max-width: 520px; }
.small { font-size: 0.85rem; color: #57606a; }
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _code(text: str) -> str:
    return f"<code>{_e(text)}</code>" if text else "<span class='small'>(unknown)</span>"


def _figure_html(figure: Figure, width: str = "") -> str:
    style = f' style="width:{width}"' if width else ""
    caption = f"<figcaption><b>{_e(figure.title)}</b>"
    caption += f": {_e(figure.caption)}" if figure.caption else ""
    caption += "</figcaption>"
    return f'<figure{style}><img src="{png_data_uri(figure.png)}" alt="{_e(figure.title)}">{caption}</figure>'


def _provenance(card: ModelCard) -> str:
    version = card.model_version or "(not a registered version)"
    same = ""
    if card.training_digest:
        same = (
            "same prepared dataset as training (test split held out)"
            if card.training_digest == card.dataset_digest
            else f"DIFFERENT from the training dataset ({card.training_digest})"
        )
    rows = [
        ("Model URI", _code(card.model_uri)),
        ("Registered version", _e(version)),
        ("Logged model id", _code(card.model_id)),
        ("Training run", _code(card.train_run_id)),
        ("Evaluation run", _code(card.evaluate_run_id)),
        ("Test data", _code(card.data_source)),
        ("Dataset digest", _code(card.dataset_digest) + (f" <span class='small'>{_e(same)}</span>" if same else "")),
        ("Test cases", _e(card.n_test)),
        ("Positive class", _e(card.positive_label) + " (negative: " + _e(card.negative_label) + ")"),
        ("Operating threshold", f"{_e(format_number(card.threshold, 4))} <span class='small'>({_e(card.threshold_source)})</span>"),
    ]
    rows += [(label, _e(value)) for label, value in card.details]
    body = "".join(f"<tr><th>{_e(label)}</th><td>{value}</td></tr>" for label, value in rows)
    return f"<table>{body}</table>"


def _metrics_table(card: ModelCard) -> str:
    rows = metric_rows(card.metrics, card.reasons)
    body = []
    for row in rows:
        value_class = "num undefined" if row.value == "undefined" else "num"
        body.append(
            f"<tr data-metric=\"{_e(row.key)}\"><td>{_e(row.label)}</td><td class=\"{value_class}\">{_e(row.value)}</td>"
            f"<td class=\"num\">{_e(row.interval)}</td><td>{_e(row.note)}</td></tr>"
        )
    return (
        "<table><thead><tr><th>Metric (test split)</th><th>Value</th><th>95 % CI (bootstrap)</th>"
        "<th>Note</th></tr></thead><tbody>" + "".join(body) + "</tbody></table>"
    )


def _audit_html(audit: AuditSummary | None) -> str:
    if audit is None:
        return "<p class='verdict failed'>No shortcut audit was run.</p>"
    verdict = "PASSED" if audit.passed else "FAILED"
    css = "passed" if audit.passed else "failed"
    rows = [
        ("Mean lung focus (gated)", format_number(audit.lung_focus_mean), f">= {format_number(audit.min_lung_focus, 2)} to pass"),
        ("Median lung focus", format_number(audit.lung_focus_median), ""),
        ("Mean lung-focus lift", format_number(audit.lung_focus_lift_mean),
         "lung focus / the mask's area share: 1.0 is a heatmap spread evenly over the image"
         + (f"; >= {format_number(audit.min_lung_focus_lift, 2)} to pass" if audit.min_lung_focus_lift > 0 else "")),
        ("Mean border-band share", format_number(audit.border_share_mean), "mass near the image edges (labels, markers)"),
        ("Heatmaps scored", str(audit.n), audit.mask_source),
    ]
    table = "".join(f"<tr><th>{_e(a)}</th><td class='num'>{_e(b)}</td><td>{_e(c)}</td></tr>" for a, b, c in rows)
    return (
        f"<p class='verdict {css}'>Shortcut audit {verdict}: {_e(audit.reason)}</p>"
        f"<p>{_e(audit.method)} Passing does not prove the absence of shortcuts (a shortcut can sit "
        "inside the lungs, e.g. exposure differences between sources).</p>"
        f"<table>{table}</table>"
    )


def _occlusion_html(result: OcclusionResult | None, note: str) -> str:
    """The occlusion check: each view's ROC-AUC and its change against the whole view, or why there are none."""
    intro = ("<p>Not gated here; promote's occlusion gate (required by default) reads the lungs-only change's "
             "lower bound (docs/serving.md). Each test image with a real lung mask is scored again with everything outside "
             "the lungs set to the lungs' mean grey (lungs only), and with the lungs set to the mean grey of the "
             "rest (outside only); a model that reads the lungs keeps its ranking with the lungs only and loses "
             "it with them hidden. The lung fields' outline survives both views; the shape-only view (the mask "
             "in two fixed greys, no pixel of the image) asks about the outline alone.</p>")
    if result is None:
        return intro + f"<p>Not run: {_e(note or 'no occlusion check in this evaluation')}.</p>"
    if not result.computed:
        return intro + f"<p>Not computed: {_e(result.reason)}.</p>"
    rows = []
    for view, label in VIEW_LABELS.items():
        value, low, high = result.auc[view]
        diff = result.change.get(view)
        change = "" if diff is None else f"{diff.estimate:+.3f} [{diff.low:+.3f}, {diff.high:+.3f}]"
        rows.append(f"<tr><th>{_e(label)}</th><td class='num'>{_e(format_number(value))} "
                    f"[{_e(format_number(low))}, {_e(format_number(high))}]</td><td class='num'>{_e(change)}</td></tr>")
    return (intro + "<table><tr><th>view</th><th>ROC-AUC [95 % CI]</th><th>change against the whole view "
            "[95 % CI, paired]</th></tr>" + "".join(rows) + "</table>"
            + "<ul>" + "".join(f"<li>{_e(line)}</li>" for line in result.reading) + "</ul>"
            + f"<p class='small'>{_e(result.n)} cases ({_e(result.n_positive)} positive); {_e(note)}</p>")


def _with_ci(values: Mapping[str, float], name: str) -> str:
    value = values.get(name)
    low, high = values.get(f"{name}_ci_low"), values.get(f"{name}_ci_high")
    if _is_missing(value):
        return "undefined"
    ci = "" if _is_missing(low) or _is_missing(high) else f" [{format_number(low)}, {format_number(high)}]"
    return format_number(value) + ci


def _external_html(card: ModelCard) -> str:
    """One table: the internal test split, then each external collection, at the same threshold."""
    head = ("<table><tr><th>data</th><th>n</th><th>positives</th><th>dropped (duplicates of training)</th>"
            "<th>sensitivity</th><th>specificity</th><th>PPV</th><th>NPV</th><th>ROC-AUC</th>"
            "<th>occluded (with a lung mask)</th><th>ROC-AUC, lungs only</th><th>ROC-AUC, lungs hidden</th></tr>")
    internal = {**card.metrics, **occlusion_metrics(card.occlusion)}
    rows = [("internal test split", card.n_test, int(card.metrics.get("tp", 0) + card.metrics.get("fn", 0)), 0,
             internal)]
    rows += [(f"{name} ({folder})", n, n_pos, dropped, values) for name, folder, n, n_pos, dropped, values in card.external]
    body = "".join(
        f"<tr><td>{_e(label)}</td><td>{n}</td><td>{n_pos}</td><td>{dropped}</td>"
        + "".join(f"<td>{_e(_with_ci(values, m))}</td>" for m in ("sensitivity", "specificity", "ppv", "npv", "roc_auc"))
        + f"<td>{_e(format_count(values.get(N_METRIC)))}</td>"
        + "".join(f"<td>{_e(_with_ci(values, auc_metric(view)))}</td>" for view in ("lungs_only", "outside_only"))
        + "</tr>"
        for label, n, n_pos, dropped, values in rows
    )
    warnings = "".join(f"<div class='warning'>{_e(w)}</div>" for w in card.external_warnings)
    note = ("<p class='small'>Lungs only / lungs hidden: the occlusion check (see below) on the films with a real "
            "lung mask (the 'occluded' column; where that is fewer than n, the check's own whole-view AUC is "
            "logged as occlusion_whole_roc_auc); undefined where it did not run or failed (occluded 0).</p>")
    return head + body + "</table>" + note + warnings


def render_html(card: ModelCard) -> str:
    """The complete, self-contained HTML document for ``card`` (UTF-8 text)."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(card.title)}: {_e(card.model_uri)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{_e(card.title)}</h1>",
        f"<p class='small'>Binary classifier: {_e(card.positive_label)} vs {_e(card.negative_label)} on chest X-rays.</p>",
        "<div class='warning'><b>Research use only; not a medical device.</b> Do not use these results "
        "to diagnose, triage or treat anyone (see intended use and limitations).</div>",
        "<h2>Model and data</h2>",
        _provenance(card),
        "<h2>Intended use and limitations</h2>",
        f"<p>{_e(INTENDED_USE)}</p>",
        "<ul>" + "".join(f"<li>{_e(item)}</li>" for item in LIMITATIONS) + "</ul>",
    ]
    if card.notes:
        parts.append("<h2>Notes on this evaluation</h2>")
        parts.append("<ul>" + "".join(f"<li>{_e(note)}</li>" for note in card.notes) + "</ul>")
    parts += [
        "<h2>Test metrics</h2>",
        f"<p>At threshold {_e(format_number(card.threshold, 4))}; a case is called "
        f"{_e(card.positive_label)} when its probability is at least the threshold. Undefined values "
        "carry the reason.</p>",
        _metrics_table(card),
    ]
    if card.figures:
        parts.append("<h2>Figures</h2>")
        parts += [_figure_html(figure, "48%") for figure in card.figures]
    if card.external:
        parts.append("<h2>Internal test split and external collections</h2>")
        parts.append(_external_html(card))
    parts.append("<h2>Shortcut audit</h2>")
    parts.append(_audit_html(card.audit))
    parts.append("<h2>Occlusion check</h2>")
    parts.append(_occlusion_html(card.occlusion, card.occlusion_note))
    if card.occlusion_gate:
        parts.append("<p>What promote's occlusion gates (at their defaults) say; promote judges the test split, and an "
                     "external collection only when given its folder (-P external=...):</p><ul>"
                     + "".join(f"<li>{_e(line)}</li>" for line in card.occlusion_gate) + "</ul>")
    if card.occlusion_figure is not None:
        parts.append(_figure_html(card.occlusion_figure, "100%"))
    if card.gradcam is not None:
        parts.append("<h2>Grad-CAM examples</h2>")
        parts.append(
            f"<p>Where the model found evidence for {_e(card.positive_label)}, drawn on the preprocessed "
            "images it saw, for a fixed seeded sample of each confusion cell (TP, FP, TN, FN).</p>"
        )
        parts.append(_figure_html(card.gradcam, "100%"))
    parts.append(
        f"<p class='small'>Generated by cxrexp evaluate, run {_e(card.evaluate_run_id)}.</p></body></html>"
    )
    return "\n".join(parts)


def evaluation_details(spec: Any, n_bootstrap: int, seed: int, prevalence: float | None) -> list[tuple[str, str]]:
    """The card's "how it was evaluated" rows: image preparation (an ``ImageSpec``), bootstrap, prevalence."""
    return [
        ("Image preparation", ", ".join(f"{k}={v}" for k, v in asdict(spec).items())),
        ("Bootstrap", f"{n_bootstrap} resamples, seed {seed}"),
        ("Stated prevalence", f"{prevalence:g}" if prevalence is not None else "none"),
    ]


def gallery_figure(png: bytes | None) -> Figure | None:
    """The Grad-CAM gallery as the card shows it (None: no gallery, e.g. a model Grad-CAM cannot explain)."""
    if not png:
        return None
    return Figure("HiResCAM per confusion cell", png, "left: heatmap overlay, right: iso-contours at 0.5 and 0.75 of the peak")


__all__ = [
    "evaluation_details",
    "gallery_figure",
    "AuditSummary",
    "Figure",
    "INTENDED_USE",
    "LIMITATIONS",
    "MetricRow",
    "ModelCard",
    "format_count",
    "format_number",
    "metric_rows",
    "png_data_uri",
    "render_html",
]
