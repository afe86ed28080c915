"""The ``evaluate`` step: flags -> ``EvaluateConfig`` -> checks -> one evaluate run (``mlflow_edge.evaluation_run``).

What the run logs is listed in ``cxrexp/mlflow_edge/evaluation_run.py``.
"""

from __future__ import annotations

import math

from cxrexp.config import EvaluateConfig
from cxrexp.errors import ConfigError
from cxrexp.mlflow_edge import evaluation_run
from cxrexp.mlflow_edge.model_uri import URI_FORMS


def check_config(cfg: EvaluateConfig) -> None:
    """Raise ``ConfigError`` naming the flag for settings that cannot work."""
    problems = []
    if cfg.threshold > 1:
        problems.append(f"--threshold {cfg.threshold} must be in [0, 1] (or negative for the model's own)")
    if cfg.prevalence > 1:
        problems.append(f"--prevalence {cfg.prevalence} must be in [0, 1] (or negative for none)")
    if cfg.n_bootstrap < 0:
        problems.append(f"--n-bootstrap {cfg.n_bootstrap} must be >= 0 (0 disables the intervals)")
    if cfg.gradcam_per_cell < 0:
        problems.append(f"--gradcam-per-cell {cfg.gradcam_per_cell} must be >= 0")
    if not 0 <= cfg.min_lung_focus <= 1:
        problems.append(f"--min-lung-focus {cfg.min_lung_focus} must be in [0, 1]")
    if not (math.isfinite(cfg.min_lung_focus_lift) and cfg.min_lung_focus_lift >= 0):
        problems.append(f"--min-lung-focus-lift {cfg.min_lung_focus_lift} must be a number >= 0 (0: not gated)")
    if cfg.min_audit_heatmaps < 1:
        problems.append(f"--min-audit-heatmaps {cfg.min_audit_heatmaps} must be >= 1")
    if not 0 <= cfg.occlusion_margin < 0.5:  # also NaN: no comparison holds
        problems.append(f"--occlusion-margin {cfg.occlusion_margin} must be in [0, 0.5) (a share of the image side)")
    if cfg.audit_lung_model:
        from cxrexp.mlflow_edge.model_uri import parse_model_uri

        try:
            parse_model_uri(cfg.audit_lung_model)
        except ConfigError as exc:
            problems.append(f"--audit-lung-model: {exc} (or \"\" for the geometric prior)")
    if cfg.batch_size < 1:
        problems.append(f"--batch-size {cfg.batch_size} must be >= 1")
    if not cfg.model_uri.strip():
        problems.append(f"--model-uri is empty: give {URI_FORMS}")
    from pathlib import Path

    for folder in cfg.external:
        if not Path(folder).expanduser().is_dir():
            problems.append(f"--external {folder}: not a folder (give class folders, e.g. COVID/ and Normal/)")
    if problems:
        raise ConfigError("; ".join(problems))


def run(cfg: EvaluateConfig) -> str:
    """Check the flags, then evaluate ``cfg.model_uri`` on its test split as one MLflow run; returns the run id."""
    check_config(cfg)
    return evaluation_run.run(cfg)
