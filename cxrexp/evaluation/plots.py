"""Figures for a run. Every function returns a ``matplotlib.figure.Figure`` and never saves or shows it.

Figures are built with the object API on an Agg canvas (no pyplot state, no GUI, safe in worker
threads); the edge saves or logs them (``mlflow.log_figure(fig, "plots/roc.png")``) and may then
drop them. ``plt.close(fig)`` is harmless on them but not needed: nothing global holds them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.calibration import calibration_curve
from sklearn.metrics import precision_recall_curve, roc_curve

from cxrexp.evaluation import metrics

DEFAULT_CLASS_NAMES = ("Normal", "COVID")  # (negative, positive)


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


# --------------------------------------------------------------------------------------------------
# Classification


def confusion_matrix_figure(
    confusion: metrics.Confusion,
    class_names: Sequence[str] = DEFAULT_CLASS_NAMES,
    threshold: float | None = None,
) -> Figure:
    """Two panels: counts, and row-normalised % (each true class sums to 100 %). 2 axes.

    class_names: (negative, positive). Rows are the true class, columns the predicted class.
    """
    if len(class_names) != 2:
        raise ValueError(f"class_names must be (negative, positive); got {list(class_names)}")
    counts = np.array([[confusion.tn, confusion.fp], [confusion.fn, confusion.tp]], dtype=np.float64)
    row_totals = counts.sum(axis=1, keepdims=True)
    percent = np.divide(100 * counts, row_totals, out=np.full_like(counts, np.nan), where=row_totals > 0)

    fig = _new_figure(9, 4)
    axes = fig.subplots(1, 2)
    panels = (
        # (axis, values shown as text, cell shade in [0, 1], title, text format)
        (axes[0], counts, counts / max(counts.max(), 1.0), "Counts", lambda v: f"{int(v)}"),
        (axes[1], percent, np.nan_to_num(percent / 100), "Row-normalised (% of true class)",
         lambda v: "n/a" if np.isnan(v) else f"{v:.1f} %"),
    )
    for ax, values, shade, title, text in panels:
        ax.imshow(shade, cmap="Blues", vmin=0, vmax=1)
        for (row, col), value in np.ndenumerate(values):
            ax.text(col, row, text(value), ha="center", va="center",
                    color="white" if shade[row, col] > 0.5 else "black", fontsize=12)
        ax.set_xticks([0, 1], [f"pred {name}" for name in class_names])
        ax.set_yticks([0, 1], [f"true {name}" for name in class_names])
        ax.set_title(title)
    if threshold is not None:
        fig.suptitle(f"Confusion matrix at threshold {threshold:.3f}")
    return fig


def roc_figure(labels, probabilities, threshold: float, ci: tuple[float, float] | None = None) -> Figure:
    """ROC curve, AUC (and its CI) in the legend, the operating point at ``threshold`` marked. 1 axis."""
    labels_arr, prob_arr = metrics.check_predictions(labels, probabilities)
    fig = _new_figure(5, 5)
    ax = fig.subplots()
    auc = metrics.roc_auc(labels_arr, prob_arr)
    if np.isfinite(auc):
        fpr, tpr, _ = roc_curve(labels_arr, prob_arr)
        label = f"ROC (AUC {auc:.3f}" + (f", 95 % CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else ")")
        ax.plot(fpr, tpr, lw=2, label=label)
        point = metrics.rates(metrics.confusion(labels_arr, prob_arr, threshold))
        sens, spec = point["sensitivity"], point["specificity"]
        ax.plot(1 - spec, sens, "o", color="crimson", ms=8,
                label=f"threshold {threshold:.3f}: sens {sens:.2f}, spec {spec:.2f}")
    else:
        ax.text(0.5, 0.5, "ROC undefined: only one class present", ha="center", va="center")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity (false positive rate)",
           ylabel="sensitivity (true positive rate)", title="ROC curve")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def pr_figure(labels, probabilities, threshold: float | None = None) -> Figure:
    """Precision-recall curve with average precision and the prevalence baseline. 1 axis."""
    labels_arr, prob_arr = metrics.check_predictions(labels, probabilities)
    fig = _new_figure(5, 5)
    ax = fig.subplots()
    average_precision = metrics.pr_auc(labels_arr, prob_arr)
    if np.isfinite(average_precision):
        precision, recall, _ = precision_recall_curve(labels_arr, prob_arr)
        ax.step(recall, precision, where="post", lw=2, label=f"PR (AP {average_precision:.3f})")
        prevalence = labels_arr.mean()
        ax.axhline(prevalence, ls="--", color="grey", lw=1, label=f"prevalence {prevalence:.3f}")
        if threshold is not None:
            point = metrics.rates(metrics.confusion(labels_arr, prob_arr, threshold))
            if np.isfinite(point["ppv"]):
                ax.plot(point["sensitivity"], point["ppv"], "o", color="crimson", ms=8,
                        label=f"threshold {threshold:.3f}")
        ax.legend(loc="lower left", fontsize=8)
    else:
        ax.text(0.5, 0.5, "PR curve undefined: only one class present", ha="center", va="center")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="recall (sensitivity)", ylabel="precision (PPV)",
           title="Precision-recall curve")
    return fig


def calibration_figure(labels, probabilities, n_bins: int = 10) -> Figure:
    """Reliability curve (uniform bins) above a histogram of the probabilities. 2 axes."""
    labels_arr, prob_arr = metrics.check_predictions(labels, probabilities)
    fig = _new_figure(5, 6)
    curve_ax, hist_ax = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    curve_ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfectly calibrated")
    if labels_arr.size:
        observed, predicted = calibration_curve(labels_arr, prob_arr, n_bins=n_bins, strategy="uniform")
        curve_ax.plot(predicted, observed, "o-", lw=2,
                      label=f"model (Brier {metrics.brier(labels_arr, prob_arr):.3f})")
    curve_ax.set(ylim=(0, 1.01), ylabel="observed fraction positive", title="Calibration")
    curve_ax.legend(loc="upper left", fontsize=8)
    bins = np.linspace(0, 1, n_bins + 1)
    for value, name, colour in ((0, "negatives", "tab:blue"), (1, "positives", "tab:orange")):
        hist_ax.hist(prob_arr[labels_arr == value], bins=bins, alpha=0.6, color=colour, label=name)
    hist_ax.set(xlim=(0, 1), xlabel="predicted probability", ylabel="cases")
    hist_ax.legend(fontsize=8)
    return fig


def threshold_sweep_figure(sweep: pd.DataFrame, threshold: float | None = None) -> Figure:
    """Sensitivity and specificity (PPV/NPV dashed) against threshold, chosen threshold marked. 1 axis.

    sweep: the DataFrame of ``metrics.threshold_sweep``.
    """
    missing = {"threshold", "sensitivity", "specificity"} - set(sweep.columns)
    if missing:
        raise ValueError(f"sweep lacks columns {sorted(missing)}; build it with metrics.threshold_sweep")
    fig = _new_figure(6, 4)
    ax = fig.subplots()
    ax.plot(sweep["threshold"], sweep["sensitivity"], lw=2, label="sensitivity")
    ax.plot(sweep["threshold"], sweep["specificity"], lw=2, label="specificity")
    for name in ("ppv", "npv"):
        if name in sweep.columns:
            ax.plot(sweep["threshold"], sweep[name], ls="--", lw=1, label=name.upper())
    if threshold is not None:
        ax.axvline(threshold, color="crimson", lw=1.5, label=f"chosen {threshold:.3f}")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="threshold", ylabel="rate", title="Threshold sweep")
    ax.legend(fontsize=8, loc="lower center", ncols=3)
    return fig


def learning_curves_figure(history: Mapping[str, Sequence[float]]) -> Figure:
    """One axis per metric of a Keras-like history (``loss`` with ``val_loss`` on the same axis, ...).

    history: name -> per-epoch values (``keras.callbacks.History.history``). The learning rate, if
    logged, gets its own log-scale axis.
    """
    bases = [name for name in history if not name.startswith("val_")]
    bases += [name[4:] for name in history if name.startswith("val_") and name[4:] not in history]
    if not bases:
        raise ValueError("history is empty: nothing to plot (pass keras History.history)")
    fig = _new_figure(4 * len(bases), 3.5)
    axes = np.atleast_1d(fig.subplots(1, len(bases)))
    for ax, base in zip(axes, bases):
        for name, style in ((base, "-"), (f"val_{base}", "--")):
            if name in history:
                values = np.asarray(history[name], dtype=np.float64)
                ax.plot(np.arange(1, values.size + 1), values, style, marker=".", label=name)
        if base in ("learning_rate", "lr"):
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="epoch", title=base)
        ax.legend(fontsize=8)
    return fig


# --------------------------------------------------------------------------------------------------
# Images


def enhancement_panel(pairs: Sequence[tuple[str, np.ndarray, np.ndarray]]) -> Figure:
    """Before/after enhancement, each image with its grey-level histogram under it.

    pairs: (title, before uint8 HxW, after uint8 HxW). Layout: two rows per pair (images, then
    histograms) and two columns (before, after): 4 axes per pair.
    """
    if not pairs:
        raise ValueError("enhancement_panel needs at least one (title, before, after) pair")
    fig = _new_figure(6, 4.5 * len(pairs))
    axes = fig.subplots(2 * len(pairs), 2, height_ratios=[3, 1] * len(pairs), squeeze=False)
    edges = np.arange(257) - 0.5
    for i, (title, before, after) in enumerate(pairs):
        for col, (stage, image) in enumerate((("before", before), ("after", after))):
            image_arr = np.asarray(image)
            if image_arr.dtype != np.uint8 or image_arr.ndim != 2:
                raise ValueError(
                    f"{title} ({stage}): want uint8 HxW; got {image_arr.dtype} {image_arr.shape}"
                )
            image_ax, hist_ax = axes[2 * i, col], axes[2 * i + 1, col]
            image_ax.imshow(image_arr, cmap="gray", vmin=0, vmax=255)
            image_ax.set_title(f"{title}: {stage}", fontsize=9)
            image_ax.axis("off")
            # One stairs artist instead of 256 bar patches: the panel renders several times faster.
            hist_ax.stairs(np.bincount(image_arr.ravel(), minlength=256), edges, fill=True, color="grey")
            hist_ax.set_xlim(-0.5, 255.5)
            hist_ax.set_yticks([])
            hist_ax.tick_params(labelsize=7)
    return fig


def gradcam_gallery(items: Sequence[tuple[str, np.ndarray]], ncols: int = 4) -> Figure:
    """Grid of Grad-CAM overlays (or occlusion views), one titled axis per item (empty grid cells are removed).

    items: (title, uint8 HxWx3 RGB overlay from ``gradcam.overlay``/``contour_overlay``, or HxW grey).
    """
    if not items:
        fig = _new_figure(4, 1.5)
        ax = fig.subplots()
        ax.text(0.5, 0.5, "no Grad-CAM images", ha="center", va="center")
        ax.axis("off")
        return fig
    ncols = max(1, min(ncols, len(items)))
    nrows = -(-len(items) // ncols)
    fig = _new_figure(2.6 * ncols, 2.8 * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, (title, image) in zip(axes, items):
        image = np.asarray(image)
        if image.ndim == 2:  # grey levels as stored (0-255), not stretched: a flat fill must look flat
            ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        else:
            ax.imshow(image)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    for ax in axes[len(items):]:
        ax.remove()
    return fig


def lung_focus_figure(lung_focus: Sequence[float], min_lung_focus: float) -> Figure:
    """Histogram of per-image lung focus (NaN ones counted in the title) with the gate line. 1 axis."""
    values = np.asarray(lung_focus, dtype=np.float64)
    finite = values[np.isfinite(values)]
    fig = _new_figure(6, 4)
    ax = fig.subplots()
    ax.hist(finite, bins=np.linspace(0, 1, 21), color="tab:blue", alpha=0.8)
    ax.axvline(min_lung_focus, color="crimson", lw=2, label=f"min_lung_focus {min_lung_focus:.2f}")
    if finite.size:
        ax.axvline(finite.mean(), color="black", ls="--", lw=1.5, label=f"mean {finite.mean():.2f}")
    skipped = values.size - finite.size
    ax.set(xlim=(0, 1), xlabel="share of Grad-CAM mass inside the lung mask", ylabel="images",
           title=f"Lung focus (n={finite.size}" + (f", {skipped} all-zero skipped)" if skipped else ")"))
    ax.legend(fontsize=8)
    return fig


__all__ = [
    "calibration_figure",
    "confusion_matrix_figure",
    "enhancement_panel",
    "gradcam_gallery",
    "learning_curves_figure",
    "lung_focus_figure",
    "pr_figure",
    "roc_figure",
    "threshold_sweep_figure",
]
