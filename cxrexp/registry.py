"""The Model Registry edge: registering trained models under an alias (aliases, not deprecated stages)."""

from __future__ import annotations

import logging
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

CHALLENGER = "challenger"
CHAMPION = "champion"
PREVIOUS_CHAMPION = "previous-champion"


def register(model_uri: str, name: str, *, alias: str = CHALLENGER, tags: dict[str, Any] | None = None) -> str:
    """Register ``model_uri`` as a new version of ``name`` and point ``alias`` at it; returns the version."""
    clean_tags = {k: str(v) for k, v in (tags or {}).items() if v is not None}
    version = mlflow.register_model(model_uri, name, tags=clean_tags)
    MlflowClient().set_registered_model_alias(name, alias, version.version)
    log.info("registered %s as %s version %s (@%s)", model_uri, name, version.version, alias)
    return str(version.version)
