"""The ``segment`` step: flags -> ``SegmentConfig`` -> one segment run (``mlflow_edge.segmenter_run``)."""

from __future__ import annotations

from cxrexp.config import SegmentConfig
from cxrexp.mlflow_edge import segmenter_run


def run(cfg: SegmentConfig) -> str:
    """Train the lung segmenter on ``cfg.mask_dirs`` (or the synthetic masks); returns the run id."""
    return segmenter_run.run(cfg)
