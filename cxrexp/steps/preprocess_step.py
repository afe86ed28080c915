"""The ``preprocess`` step: flags -> ``PreprocessConfig`` -> one MLflow run (``mlflow_edge.preprocess_run``)."""

from __future__ import annotations

from cxrexp.config import PreprocessConfig
from cxrexp.mlflow_edge import preprocess_run


def run(cfg: PreprocessConfig) -> str:
    """Run the step; returns the preprocess run id."""
    return preprocess_run.run(cfg)
