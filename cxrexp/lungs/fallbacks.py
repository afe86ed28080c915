"""Counting lung-crop fallbacks per class, and saying when they differ by class (pure).

An image whose lung mask is not trusted is kept uncropped. If that happens more often in one class
than another, the uncropped view itself tells the classes apart (its borders, text and exposure
are back in the picture), which is the shortcut the crop was meant to remove: the warning says so.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import chi2_contingency

# Warn when the rates differ beyond chance (chi-square test of independence) *and* by enough to matter.
P_VALUE = 0.05
MIN_RATE_GAP = 0.02


def count_by_class(class_names: pd.Series, fell_back: pd.Series | np.ndarray) -> dict[str, int]:
    """{class name: number of images that fell back}, every class present in ``class_names`` listed."""
    frame = pd.DataFrame({"class_name": np.asarray(class_names), "fell_back": np.asarray(fell_back, dtype=bool)})
    return {str(k): int(v) for k, v in frame.groupby("class_name", sort=True)["fell_back"].sum().items()}


def differing_rates_warning(class_names: pd.Series, fell_back: pd.Series | np.ndarray) -> str:
    """A plain-words warning when the fallback rate differs by class, else ``""``."""
    frame = pd.DataFrame({"class_name": np.asarray(class_names), "fell_back": np.asarray(fell_back, dtype=bool)})
    table = frame.groupby("class_name", sort=True)["fell_back"].agg(["sum", "count"])
    if len(table) < 2 or table["sum"].sum() == 0:
        return ""
    rates = table["sum"] / table["count"]
    gap = float(rates.max() - rates.min())
    contingency = np.stack([table["sum"].to_numpy(), (table["count"] - table["sum"]).to_numpy()], axis=1)
    if (contingency.sum(axis=0) == 0).any():
        return ""
    p_value = float(chi2_contingency(contingency, correction=True).pvalue)
    if gap < MIN_RATE_GAP or p_value >= P_VALUE:
        return ""
    listed = ", ".join(f"{name} {int(row['sum'])}/{int(row['count'])} ({row['sum'] / row['count']:.1%})"
                       for name, row in table.iterrows())
    return (f"lung-crop fallback rates differ by class ({listed}; chi-square p={p_value:.3g}): uncropped images "
            "carry the hospital's borders and text, so a classifier can tell the classes apart by whether "
            "the crop was applied. Check the listed images, retrain the segmenter on masks from these "
            "sources, or leave the classes' uncropped images out")


__all__ = ["MIN_RATE_GAP", "P_VALUE", "count_by_class", "differing_rates_warning"]
