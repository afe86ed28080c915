"""What the benchmark scripts share: where the real data lives, its guard, and the machine's load."""

from __future__ import annotations

import os
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CXR_MINI = PROJECT_ROOT.parent / "shared" / "data" / "cxr-mini"


def has_cxr_mini(data_dir: Path) -> bool:
    """True when ``data_dir`` holds the Kaggle layout; otherwise says what is missing on stderr."""
    if (data_dir / "COVID" / "images").is_dir():
        return True
    print(f"cxr-mini not found at {data_dir}: this benchmark needs the shared real data set "
          "(../shared/data/cxr-mini beside the project), or pass --data-dir", file=sys.stderr)
    return False


def load_average() -> str:
    """The 1/5/15-minute load averages: benchmarks on shared cores report what they ran under."""
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def use_store(work: Path) -> str:
    """Point MLflow at a SQLite store in ``work`` and run from there; returns the tracking URI.

    Why the chdir: MLflow puts a SQLite store's artifacts in ``./mlruns`` of the current folder, so
    a benchmark started from the checkout left them there, apart from their store (and lost them
    with a removed worktree). Paths the caller holds must already be absolute.
    """
    uri = f"sqlite:///{work}/mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.chdir(work)
    return uri
