"""The HTML model card: self-contained, parseable, shows every metric with its CI or its NaN reason."""

from __future__ import annotations

import base64
import math
from html.parser import HTMLParser

import pytest

from cxrexp.evaluation import model_card

NAN = float("nan")
# The smallest valid PNG: 1x1 grey pixel.
PNG_1PX = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGNgAAAAAgABSK+kcQAAAABJRU5ErkJggg=="
)


class _Collector(HTMLParser):
    """Collects tags with attributes, table cells text and all text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.rows: dict[str, list[str]] = {}
        self._row: str | None = None
        self._in_cell = False

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if tag == "tr" and "data-metric" in attributes:
            self._row = attributes["data-metric"]
            self.rows[self._row] = []
        if tag == "td" and self._row is not None:
            self._in_cell = True
            self.rows[self._row].append("")

    def handle_endtag(self, tag):
        if tag == "td":
            self._in_cell = False
        if tag == "tr":
            self._row = None

    def handle_data(self, data):
        self.text.append(data)
        if self._in_cell and self._row is not None:
            self.rows[self._row][-1] += data


def _parse(document: str) -> _Collector:
    parser = _Collector()
    parser.feed(document)
    parser.close()
    return parser


def _card(**overrides) -> model_card.ModelCard:
    settings = dict(
        model_uri="models:/cxr-covid-cnn@challenger",
        evaluate_run_id="e" * 32,
        train_run_id="t" * 32,
        data_source="/data/prepared/abc",
        dataset_digest="d03d723dce7d8233",
        training_digest="d03d723dce7d8233",
        threshold=0.4628,
        threshold_source="stored with the model",
        metrics={
            "tp": 8.0, "fp": 2.0, "tn": 18.0, "fn": 2.0, "prevalence": 1 / 3,
            "prevalence_ci_low": 0.2, "prevalence_ci_high": 0.5,
            "sensitivity": 0.8, "sensitivity_ci_low": 0.5, "sensitivity_ci_high": 1.0,
            "roc_auc": 0.9123, "roc_auc_ci_low": 0.81, "roc_auc_ci_high": 0.97,
        },
        model_version="cxr-covid-cnn v3",
        figures=[model_card.Figure("ROC curve", PNG_1PX, "operating point")],
        gradcam=model_card.Figure("Grad-CAM", PNG_1PX),
        audit=model_card.AuditSummary(True, "mean lung focus 0.71 >= 0.50 over 40 heatmaps", 0.71, 0.7, 0.1, 40, 0.5),
    )
    settings.update(overrides)
    return model_card.ModelCard(**settings)


@pytest.mark.parametrize(
    "value, expected",
    [(0.91234, "0.912"), (0.0, "0.000"), (NAN, "undefined"), (None, "undefined"), (1.0, "1.000"),
     (float("inf"), "inf")],
)
def test_format_number(value, expected):
    assert model_card.format_number(value) == expected


@pytest.mark.parametrize("value, expected", [(8.0, "8"), (0.0, "0"), (NAN, "undefined"), (12.0000001, "12")])
def test_format_count(value, expected):
    assert model_card.format_count(value) == expected


@pytest.mark.parametrize(
    "metrics, reasons, key, value, interval, note",
    [
        # defined value and interval
        ({"sensitivity": 0.8, "sensitivity_ci_low": 0.5, "sensitivity_ci_high": 1.0}, {}, "sensitivity",
         "0.800", "0.500 – 1.000", ""),
        # undefined value: its reason is the note
        ({"roc_auc": NAN, "roc_auc_ci_low": NAN, "roc_auc_ci_high": NAN},
         {"roc_auc": "no positives in the test split: ROC AUC needs both classes",
          "roc_auc_ci_low": "no positives in the test split: ROC AUC needs both classes"},
         "roc_auc", "undefined", "n/a", "no positives in the test split: ROC AUC needs both classes"),
        # defined value but undefined interval (bootstrap disabled): the interval's reason
        ({"ppv": 0.5, "ppv_ci_low": NAN, "ppv_ci_high": NAN}, {"ppv_ci_low": "bootstrap disabled (n_bootstrap=0)"},
         "ppv", "0.500", "n/a", "bootstrap disabled (n_bootstrap=0)"),
        # counts have no interval
        ({"tp": 3.0}, {}, "tp", "3", "", ""),
    ],
)
def test_metric_rows(metrics, reasons, key, value, interval, note):
    rows = {row.key: row for row in model_card.metric_rows(metrics, reasons)}
    assert (rows[key].value, rows[key].interval, rows[key].note) == (value, interval, note)


def test_metric_rows_leave_out_absent_metrics():
    keys = [row.key for row in model_card.metric_rows({"tp": 1.0, "roc_auc": 0.5}, {})]
    assert keys == ["tp", "roc_auc"]  # no ppv_at_prevalence row when no prevalence was given


def test_report_parses_and_holds_the_metrics():
    document = model_card.render_html(_card())
    parsed = _parse(document)
    assert parsed.rows["roc_auc"][1:3] == ["0.912", "0.810 – 0.970"]
    assert parsed.rows["sensitivity"][1] == "0.800"
    assert parsed.rows["tp"][1] == "8"
    text = " ".join(parsed.text)
    for needed in ("models:/cxr-covid-cnn@challenger", "cxr-covid-cnn v3", "t" * 32, "d03d723dce7d8233",
                   "not a medical device", "Shortcut learning", "external validation", "PASSED"):
        assert needed in text, needed


def test_report_is_self_contained():
    parsed = _parse(model_card.render_html(_card()))
    images = [attrs for tag, attrs in parsed.tags if tag == "img"]
    assert len(images) == 2  # the ROC figure and the Grad-CAM gallery
    assert all(attrs["src"].startswith("data:image/png;base64,") for attrs in images)
    assert base64.b64decode(images[0]["src"].split(",", 1)[1]) == PNG_1PX
    assert not [tag for tag, _ in parsed.tags if tag in ("script", "link", "iframe")]
    for _, attrs in parsed.tags:
        for name in ("src", "href"):
            assert not str(attrs.get(name) or "").startswith(("http:", "https:", "//")), attrs


def test_report_shows_nan_with_its_reason_and_a_failed_audit():
    reason = "no positives in the test split: ROC AUC needs both classes"
    card = _card(
        metrics={"tp": 0.0, "roc_auc": NAN, "roc_auc_ci_low": NAN, "roc_auc_ci_high": NAN},
        reasons={"roc_auc": reason},
        audit=model_card.AuditSummary(False, "mean lung focus 0.12 < 0.50", 0.12, 0.1, 0.8, 30, 0.5),
    )
    parsed = _parse(model_card.render_html(card))
    assert parsed.rows["roc_auc"][1:] == ["undefined", "n/a", reason]
    assert "Shortcut audit FAILED: mean lung focus 0.12 < 0.50" in " ".join(parsed.text)


@pytest.mark.parametrize("min_lift, shown", [(1.0, ">= 1.00 to pass"), (0.0, None)])
def test_report_shows_the_lift_gate_only_when_it_is_gated(min_lift, shown):
    audit = model_card.AuditSummary(False, "mean lung focus 0.65 >= 0.50 over 30 heatmaps, but its lift 0.95x < 1.00x",
                                    0.65, 0.66, 0.1, 30, 0.5, lung_focus_lift_mean=0.95, min_lung_focus_lift=min_lift)
    text = " ".join(_parse(model_card.render_html(_card(audit=audit))).text)
    assert "0.950" in text and "1.0 is a heatmap spread evenly over the image" in text
    if shown:
        assert shown in text
    else:
        assert "1.00 to pass" not in text


def test_report_escapes_untrusted_text():
    document = model_card.render_html(_card(model_uri='models:/<script>alert("x")</script>'))
    parsed = _parse(document)
    assert not [tag for tag, _ in parsed.tags if tag == "script"]
    assert '<script>alert("x")</script>' in " ".join(parsed.text)


def test_report_rejects_non_png_figures():
    with pytest.raises(ValueError, match="not PNG"):
        model_card.render_html(_card(figures=[model_card.Figure("bad", b"GIF89a....")]))


def test_report_without_audit_or_gallery_says_so():
    text = " ".join(_parse(model_card.render_html(_card(audit=None, gradcam=None, figures=()))).text)
    assert "No shortcut audit was run" in text
    assert "Grad-CAM examples" not in text
    assert math.isclose(0.4628, float(text.split("At threshold ")[1].split(";")[0]))
