"""cxrexp.plots: each function returns a Figure with the expected axes, and renders."""

from __future__ import annotations

import io

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.figure import Figure

from cxrexp.evaluation import metrics, plots

RNG = np.random.default_rng(0)
LABELS = (RNG.random(200) < 0.3).astype(int)
PROBABILITIES = np.clip(RNG.normal(np.where(LABELS == 1, 0.7, 0.3), 0.15), 0, 1)
HISTORY = {
    "loss": [0.7, 0.5, 0.4],
    "auc": [0.6, 0.8, 0.85],
    "val_loss": [0.72, 0.6, 0.55],
    "val_auc": [0.55, 0.75, 0.8],
    "learning_rate": [1e-3, 1e-3, 5e-4],
}
RAMP = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))  # 32x32 grey ramp
OVERLAY = np.zeros((32, 32, 3), np.uint8)

FIGURES = {
    # id: (build, expected number of axes)
    "confusion": (lambda: plots.confusion_matrix_figure(metrics.Confusion(tp=5, fp=2, tn=10, fn=1), threshold=0.5), 2),
    "confusion no positives": (lambda: plots.confusion_matrix_figure(metrics.Confusion(0, 2, 10, 0)), 2),
    "roc": (lambda: plots.roc_figure(LABELS, PROBABILITIES, 0.5, ci=(0.8, 0.9)), 1),
    "roc single class": (lambda: plots.roc_figure([0, 0, 0], [0.1, 0.2, 0.3], 0.5), 1),
    "pr": (lambda: plots.pr_figure(LABELS, PROBABILITIES, 0.5), 1),
    "calibration": (lambda: plots.calibration_figure(LABELS, PROBABILITIES), 2),
    "threshold sweep": (
        lambda: plots.threshold_sweep_figure(
            metrics.threshold_sweep(LABELS, PROBABILITIES, np.linspace(0, 1, 21)), threshold=0.45
        ),
        1,
    ),
    "learning curves": (lambda: plots.learning_curves_figure(HISTORY), 3),  # loss, auc, learning_rate
    "enhancement 1 pair": (lambda: plots.enhancement_panel([("a", RAMP, 255 - RAMP)]), 4),
    "enhancement 2 pairs": (lambda: plots.enhancement_panel([("a", RAMP, RAMP), ("b", RAMP, RAMP)]), 8),
    "gradcam gallery": (lambda: plots.gradcam_gallery([(f"case {i}", OVERLAY) for i in range(5)], ncols=4), 5),
    "gradcam gallery empty": (lambda: plots.gradcam_gallery([]), 1),
    "lung focus": (lambda: plots.lung_focus_figure([0.2, 0.6, 0.7, float("nan")], 0.5), 1),
}


@pytest.mark.parametrize("case", FIGURES.values(), ids=FIGURES.keys())
def test_figure_axes_and_render(case):
    build, n_axes = case
    fig = build()
    try:
        assert isinstance(fig, Figure)
        assert len(fig.axes) == n_axes
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=40)  # what mlflow.log_figure does
        assert buffer.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        plt.close(fig)


def test_figures_are_not_registered_with_pyplot():
    """The edge logs figures from loops; pyplot must not accumulate them."""
    before = plt.get_fignums()
    fig = plots.roc_figure(LABELS, PROBABILITIES, 0.5)
    assert plt.get_fignums() == before
    plt.close(fig)


def test_confusion_percentages_are_row_normalised():
    fig = plots.confusion_matrix_figure(metrics.Confusion(tp=3, fp=1, tn=3, fn=1))
    texts = [t.get_text() for t in fig.axes[1].texts]
    assert texts == ["75.0 %", "25.0 %", "25.0 %", "75.0 %"]
    plt.close(fig)


def test_roc_legend_has_auc_and_operating_point():
    fig = plots.roc_figure([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], 0.5)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend[0] == "ROC (AUC 0.750)"
    assert legend[1].startswith("threshold 0.500: sens 0.50, spec 1.00")
    plt.close(fig)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: plots.enhancement_panel([]), "at least one"),
        (lambda: plots.enhancement_panel([("x", RAMP.astype(float), RAMP)]), "uint8"),
        (lambda: plots.learning_curves_figure({}), "history is empty"),
        (lambda: plots.threshold_sweep_figure(metrics.threshold_sweep([0], [0.1], [0.5])[["threshold"]]), "lacks"),
    ],
)
def test_bad_inputs_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()
