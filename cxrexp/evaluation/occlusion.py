"""Where the model's ranking comes from, asked by hiding regions: the lungs alone, everything but the lungs (pure).

The shortcut audit reads Grad-CAM heatmaps: where the gradient of the logit is large. That is a
picture of the model, not an experiment on it, and at the last conv layer's resolution (8x8 cells at
128 px) it cannot tell the lungs' edge from the lungs. Occlusion asks the model directly: each test
image with a real lung mask is shown three times more,

- **lungs only**: everything outside the widened lung mask set to the mean grey of what is inside it;
- **outside only**: the widened mask set to the mean grey of the rest, the rest left as it is;
- **shape only**: nothing but the widened mask, drawn in two fixed greys (dark lungs, bright body),

and the ROC-AUC of each view is compared with the whole view's on the same cases (paired bootstrap).
A model that reads the lungs keeps its ranking with the lungs only and loses it with the lungs
hidden; a model that reads the hospital (borders, burnt-in text, exposure, body habitus) still ranks
cases with the lungs hidden. Both views keep the lung fields' outline and size (the edge of the flat
region), so a model that reads the lungs' shape keeps its ranking in both: the shape-only view asks
about that alone (it carries no pixel of the image, only the mask the segmenter drew). Every
occluded view is new to the model (flat regions it never saw), so no AUC here is what a model trained
on such images would score; the comparison between views is the point. A fill carries the shown
region's mean brightness to where the hidden region was: a model that reads that place then reads
the shown region's brightness, which is still information from the shown region only.

Evaluate reports it and gates nothing on it (the readings below are statements about bootstrap
intervals, not cut-offs); promote's ``occlusion`` gate (``cxrexp.promotion``) reads the lungs-only
change it logs, at a margin chosen on validation (docs/serving.md, "The occlusion gate"). Why and how
to read it, and how the mask widening was chosen: docs/evaluate.md, "The occlusion check".
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import pandas as pd

from cxrexp.config import OCCLUSION_MARGIN  # the mask widening: its home and the why are in config
from cxrexp.data.store import PreparedDataset
from cxrexp.evaluation import metrics
from cxrexp.evaluation.audit import lung_masks, widen_masks

# The shape-only view's greys: fixed, so it carries the mask's shape and size and nothing of the
# image's brightness; dark lungs in a bright body, as in an enhanced chest X-ray.
SHAPE_GREYS = (64, 192)  # (lungs, everything else)
# Images cut and scored at a time: three views of 256 images at 299 px are ~70 MB, where a whole
# external collection's views at once would take three times the collection's own pixels.
OCCLUSION_CHUNK = 256
VIEWS = ("whole", "lungs_only", "outside_only", "shape_only")
OCCLUDED = VIEWS[1:]
# The logged metrics' names, here only: evaluate writes them, promote's occlusion gate reads them.
N_METRIC = "occlusion_n"


def auc_metric(view: str, bound: str = "") -> str:
    """The metric holding ``view``'s ROC-AUC (``bound`` "", "ci_low" or "ci_high"), e.g. ``occlusion_whole_roc_auc``."""
    return f"occlusion_{view}_roc_auc" + (f"_{bound}" if bound else "")


def change_metric(view: str, bound: str = "") -> str:
    """The metric holding ``view``'s paired ROC-AUC change against the whole view (``bound`` "", "ci_low"
    or "ci_high"), e.g. ``occlusion_lungs_only_auc_change_ci_low``."""
    return f"occlusion_{view}_auc_change" + (f"_{bound}" if bound else "")


# How the report and the benchmarks name each view.
VIEW_LABELS = {"whole": "whole view (as evaluated)", "lungs_only": "lungs only",
               "outside_only": "outside only (lungs hidden)", "shape_only": "shape only (the mask, no pixels)"}


def occlusion_views(images: np.ndarray, masks: np.ndarray, margin: float = OCCLUSION_MARGIN) -> dict[str, np.ndarray]:
    """uint8 (B, S, S) images and {0, 1} (B, S, S) lung masks -> ``OCCLUDED`` view -> uint8 (B, S, S).

    In the lungs-only and outside-only views each hidden region is set to the mean grey of what
    stays visible (rounded): the fill carries nothing of what it hides (a mean over the whole image
    would: bright lesions raise it), and the view keeps the brightness of the part still shown.
    """
    images = np.asarray(images)
    masks = np.asarray(masks)
    if images.shape != masks.shape or images.ndim != 3:
        raise ValueError(f"images {images.shape} and masks {masks.shape} must both be (B, S, S)")
    if not 0 <= margin < 0.5:
        raise ValueError(f"margin={margin} must be in [0, 0.5)")
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (the stored pixels), not {images.dtype}")
    kept = widen_masks((masks > 0).astype(np.uint8), int(round(margin * images.shape[-1]))).astype(bool)
    lungs_only = np.empty_like(images)
    outside_only = np.empty_like(images)
    for i, (image, inside) in enumerate(zip(images, kept)):
        lungs_only[i] = np.where(inside, image, _mean_grey(image[inside]))
        outside_only[i] = np.where(inside, _mean_grey(image[~inside]), image)
    shape_only = np.where(kept, np.uint8(SHAPE_GREYS[0]), np.uint8(SHAPE_GREYS[1])).astype(np.uint8)
    return {"lungs_only": lungs_only, "outside_only": outside_only, "shape_only": shape_only}


def _mean_grey(pixels: np.ndarray) -> np.uint8:
    """The rounded mean of ``pixels``; mid-grey when there are none (a mask covering all or nothing)."""
    return np.uint8(np.rint(pixels.mean())) if pixels.size else np.uint8(128)


@dataclass(frozen=True)
class OcclusionResult:
    """The occlusion check over ``n`` cases (``n_positive`` of them positive).

    auc: view -> (ROC-AUC, CI low, CI high) for ``VIEWS``; change: each of ``OCCLUDED`` -> the paired bootstrap difference (that view's AUC minus the whole view's, on the same cases);
    reading: plain-words lines for the report; reason: why nothing was computed ("" when it was);
    examples: (title, uint8 (S, S)) for the report's figure: every view of the first positive and the
    first negative case, titled with the model's probability for that view.
    """

    n: int
    n_positive: int
    auc: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    change: dict[str, metrics.PairedDifference] = field(default_factory=dict)
    reading: tuple[str, ...] = ()
    reason: str = ""
    examples: tuple[tuple[str, np.ndarray], ...] = ()

    @property
    def computed(self) -> bool:
        return not self.reason

    def logged_metrics(self) -> dict[str, float]:
        """Flat ``occlusion_*`` metrics for MLflow (only ``occlusion_n`` when nothing was computed)."""
        out: dict[str, float] = {N_METRIC: float(self.n)}
        for view, (value, low, high) in self.auc.items():
            out.update({auc_metric(view): value, auc_metric(view, "ci_low"): low, auc_metric(view, "ci_high"): high})
        for view, diff in self.change.items():
            out.update({change_metric(view): diff.estimate, change_metric(view, "ci_low"): diff.low,
                        change_metric(view, "ci_high"): diff.high})
        return out


def occlusion_metrics(result: OcclusionResult | None) -> dict[str, float]:
    """``occlusion_*`` for a run: the result's, or ``occlusion_n`` 0 when the check failed (None), so "not
    run" is never a missing metric (the test split's and each external collection's alike)."""
    return result.logged_metrics() if result is not None else {N_METRIC: 0.0}


def _against_chance(auc: tuple[float, float, float], what: str, above: str, below: str, positive: str,
                    negative: str) -> str:
    """One line: where ``auc``'s interval lies against 0.5, for the view ``what`` names."""
    value, low, high = auc
    if not (np.isfinite(low) and np.isfinite(high)):
        return f"{what} the model scores ROC-AUC {value:.3f} (no interval: bootstrap off or too few cases, so no reading)."
    figure = f"ROC-AUC {value:.3f} [{low:.3f}, {high:.3f}]"
    if low > 0.5:
        return f"{what} the model still ranks {positive} above {negative} ({figure}, above chance): {above}"
    if high < 0.5:
        return f"{what} the model ranks cases backwards ({figure}): {below}"
    return f"{what} the model cannot be told from chance ({figure})."


def _reading(auc: dict[str, tuple[float, float, float]], change: dict[str, metrics.PairedDifference],
             positive: str, negative: str) -> tuple[str, ...]:
    """What the intervals say, in plain words; each statement is about an interval, not a cut-off."""
    outside = _against_chance(
        auc["outside_only"], "With the lungs hidden", "part of its evidence lies outside the lung fields (borders, "
        "text, exposure, body outline) or in the lungs' outline itself.",
        "what lies outside the lungs pulls against its lung evidence.", positive, negative)
    diff = change["lungs_only"]
    if not (np.isfinite(diff.low) and np.isfinite(diff.high)):
        inside = (f"With only the lungs shown its ROC-AUC changes by {diff.estimate:+.3f} (no interval: "
                  "bootstrap off or too few cases, so no reading).")
    elif diff.high < 0:
        inside = (f"With only the lungs shown it loses {-diff.estimate:.3f} of ROC-AUC [{-diff.high:.3f}, "
                  f"{-diff.low:.3f}] against the whole view: it uses what lies outside the lungs too.")
    else:
        inside = (f"With only the lungs shown its ROC-AUC changes by {diff.estimate:+.3f} [{diff.low:+.3f}, "
                  f"{diff.high:+.3f}]: no loss the test cases can resolve.")
    shape = _against_chance(
        auc["shape_only"], "From the lung fields' shape alone (no pixel of the image)", "their size and outline "
        "carry part of its ranking.", "their size and outline point it the wrong way.", positive, negative)
    return outside, inside, shape


def occlusion_check(labels, probabilities: dict[str, np.ndarray], *, n_bootstrap: int, seed: int,
                    positive: str = "COVID", negative: str = "Normal") -> OcclusionResult:
    """Score the views of the same cases: ``probabilities`` maps each of ``VIEWS`` to float (n,).

    Needs both classes among the cases (else a result with the reason and nothing computed); a
    non-finite probability is an error (a broken forward pass must not read as a finding).
    ``n_bootstrap`` 0 (evaluate's "no intervals"): NaN intervals, and readings that say so.
    """
    labels_arr = np.asarray(labels).astype(np.int64).reshape(-1)
    n, n_positive = int(labels_arr.size), int(labels_arr.sum())
    missing = [view for view in VIEWS if view not in probabilities]
    if missing:
        raise ValueError(f"probabilities lack the views {missing} (need {VIEWS})")
    for view in VIEWS:
        values = np.asarray(probabilities[view], dtype=np.float64)
        if values.shape != labels_arr.shape:
            raise ValueError(f"{view}: {values.shape} probabilities for {labels_arr.shape} labels")
        if not np.isfinite(values).all():
            raise ValueError(f"{view}: {int((~np.isfinite(values)).sum())} non-finite probabilities")
    if n_positive == 0 or n_positive == n:
        return OcclusionResult(n, n_positive, reason=(
            f"the {n} cases with a lung mask are all one class ({n_positive} {positive}): "
            "no ROC-AUC to compare" if n else "no case has a real lung mask (dataset or segmenter)"))
    auc: dict[str, tuple[float, float, float]] = {}
    for view in VIEWS:
        low, high = metrics.bootstrap_ci(labels_arr, probabilities[view], 0.5, n_bootstrap, seed)["roc_auc"]
        auc[view] = (metrics.roc_auc(labels_arr, probabilities[view]), low, high)
    if n_bootstrap > 0:
        change = {view: metrics.paired_difference(labels_arr, probabilities["whole"], probabilities[view],
                                                  n_bootstrap=n_bootstrap, seed=seed)
                  for view in OCCLUDED}
    else:
        change = {view: metrics.PairedDifference("roc_auc", auc[view][0] - auc["whole"][0], float("nan"),
                                                 float("nan"), 0) for view in OCCLUDED}
    return OcclusionResult(n, n_positive, auc, change, _reading(auc, change, positive, negative))


def run_occlusion(images: np.ndarray, masks: np.ndarray, labels, predict: Callable[[np.ndarray], np.ndarray], *,
                  n_bootstrap: int, seed: int, positive: str = "COVID", negative: str = "Normal",
                  margin: float = OCCLUSION_MARGIN, whole: np.ndarray | None = None,
                  chunk: int = OCCLUSION_CHUNK) -> OcclusionResult:
    """Cut the views of ``images`` (uint8 (n, S, S)) with ``masks``, score each with ``predict`` (uint8
    (n, S, S) -> float (n,) probabilities, the model's forward pass) and compare them. ``whole``: the
    probabilities of ``images`` when the caller already has them (one forward pass fewer). The views
    are cut and scored ``chunk`` images at a time, so the views never take more than ``chunk`` images' worth."""
    images = np.asarray(images)
    masks = np.asarray(masks)
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be at least 1")
    if images.shape != masks.shape:  # checked here too: the chunks below would each fail alone
        raise ValueError(f"images {images.shape} and masks {masks.shape} must both be (B, S, S)")
    if not len(images):  # nothing to show the model: the reason comes from occlusion_check
        empty = np.zeros(0)
        return occlusion_check(labels, dict.fromkeys(VIEWS, empty), n_bootstrap=n_bootstrap, seed=seed,
                               positive=positive, negative=negative)
    parts: dict[str, list[np.ndarray]] = {view: [] for view in OCCLUDED}
    for start in range(0, len(images), chunk):
        views = occlusion_views(images[start:start + chunk], masks[start:start + chunk], margin)
        for view in OCCLUDED:
            parts[view].append(np.asarray(predict(views[view]), dtype=np.float64).reshape(-1))
    whole_probabilities = predict(images) if whole is None else whole
    probabilities = {"whole": np.asarray(whole_probabilities, dtype=np.float64).reshape(-1),
                     **{view: np.concatenate(parts[view]) for view in OCCLUDED}}
    result = occlusion_check(labels, probabilities, n_bootstrap=n_bootstrap, seed=seed, positive=positive,
                             negative=negative)
    if not result.computed:  # a figure of views nobody scored would only confuse the reader
        return result
    return replace(result, examples=_examples(images, masks, probabilities, labels, positive, negative, margin))


def _examples(images: np.ndarray, masks: np.ndarray, probabilities: dict[str, np.ndarray], labels, positive: str,
              negative: str, margin: float) -> tuple[tuple[str, np.ndarray], ...]:
    """Every view of the first case of each class (positive first), titled with its probability."""
    labels_arr = np.asarray(labels).astype(np.int64).reshape(-1)
    out = []
    for label, name in ((1, positive), (0, negative)):
        found = np.flatnonzero(labels_arr == label)
        if found.size:
            i = int(found[0])
            shown = {"whole": images[i], **{v: a[0] for v, a in occlusion_views(images[i:i + 1], masks[i:i + 1],
                                                                                   margin).items()}}
            out += [(f"{name}: {VIEW_LABELS[view]}\np={float(probabilities[view][i]):.2f}", shown[view])
                    for view in VIEWS]
    return tuple(out)


def occlusion_for(dataset: PreparedDataset, frame: pd.DataFrame, predict: Callable[[np.ndarray], np.ndarray], *,
                  n_bootstrap: int, seed: int, segment: Callable[[list[np.ndarray]], list[np.ndarray]] | None = None,
                  segmenter_name: str = "", margin: float = OCCLUSION_MARGIN,
                  whole: np.ndarray | None = None) -> tuple[OcclusionResult, str]:
    """The occlusion check on the rows of a prepared ``dataset`` that ``frame`` lists (columns ``row``,
    ``has_mask``, ``label``: a split or an external collection's manifest); (result, mask note).

    Masks as the audit finds them (``audit.lung_masks``: stored with the image, else ``segment``'s when
    plausible); rows left with only the geometric prior, or with an empty mask, are not occluded (a
    guessed or empty region hides nothing real). ``whole``: the model's probabilities for ``frame``'s
    rows, in order, when the caller has them.
    """
    rows = frame["row"].to_numpy(np.int64)
    found = lung_masks(dataset, rows, frame["has_mask"].to_numpy(bool), segment, segmenter_name)
    keep = np.flatnonzero(found.real & found.masks.any(axis=(1, 2)))
    stored = dataset.images()
    size = dataset.image_size
    images = (np.stack([np.asarray(stored[int(r)]) for r in rows[keep]]) if keep.size
              else np.zeros((0, size, size), np.uint8))
    result = run_occlusion(images, found.masks[keep], frame["label"].to_numpy(np.int64)[keep], predict,
                           n_bootstrap=n_bootstrap, seed=seed, positive=dataset.positive_class,
                           negative=dataset.negative_label, margin=margin,
                           whole=None if whole is None else np.asarray(whole, dtype=np.float64)[keep])
    return result, found.note


__all__ = [
    "N_METRIC",
    "OCCLUDED",
    "OCCLUSION_CHUNK",
    "OCCLUSION_MARGIN",
    "SHAPE_GREYS",
    "VIEWS",
    "VIEW_LABELS",
    "OcclusionResult",
    "auc_metric",
    "change_metric",
    "occlusion_check",
    "occlusion_for",
    "occlusion_metrics",
    "occlusion_views",
    "run_occlusion",
]
