"""Model URIs, parsed and resolved in one place (MLflow edge).

``parse_model_uri`` is the one parser of the URI forms cxrexp accepts (pure string work);
the other functions ask the tracking store what a URI points at. Used by evaluate (which model, which
version, which training run), promote (the URIs that load one version) and the model loader (what
exists when a URI resolves to nothing).

Forms: ``models:/<name>@<alias>``, ``models:/<name>/<version>``, ``models:/<name>/latest``,
``models:/m-<id>`` (an MLflow 3 logged model), ``runs:/<run_id>/<path>``, a local folder (``file://``
optional) holding an ``MLmodel`` file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cxrexp.credentials import redact
from cxrexp.errors import ConfigError
from cxrexp.tags import META_DIGEST_KEY, META_TRAIN_RUN_KEY, SERVING_METADATA_KEY

log = logging.getLogger(__name__)

MODELS_SCHEME = "models:/"
RUNS_SCHEME = "runs:/"
URI_FORMS = "models:/<name>@<alias>, models:/<name>/<version>, models:/m-<id>, runs:/<run_id>/model or a model folder"


@dataclass(frozen=True)
class ModelUri:
    """One parsed model URI; ``kind`` is ``alias``, ``version``, ``latest``, ``logged``, ``run`` or ``path``."""

    text: str
    kind: str
    name: str = ""  # registered model name (alias / version / latest)
    alias: str = ""
    version: str = ""
    model_id: str = ""  # m-<id> (logged)
    run_id: str = ""  # run
    path: str = ""  # artifact path inside the run, or the local folder

    @property
    def registered(self) -> bool:
        return self.kind in ("alias", "version", "latest")


def parse_model_uri(text: str) -> ModelUri:
    """The URI's parts; ``ConfigError`` (naming the accepted forms) when it is empty or malformed."""
    uri = text.strip()
    if not uri:
        raise ConfigError(f"the model URI is empty: give {URI_FORMS}")
    if uri.startswith(MODELS_SCHEME):
        rest = uri[len(MODELS_SCHEME):].strip("/")
        if not rest:
            raise ConfigError(f"{text!r} names no model: give {URI_FORMS}")
        if rest.startswith("m-") and "/" not in rest and "@" not in rest:
            return ModelUri(uri, "logged", model_id=rest)
        if "@" in rest:
            name, alias = rest.split("@", 1)
            if not name or not alias or "/" in alias:
                raise ConfigError(f"{text!r} is not models:/<name>@<alias>")
            return ModelUri(uri, "alias", name=name, alias=alias)
        name, _, version = rest.partition("/")
        if version in ("", "latest"):
            return ModelUri(uri, "latest", name=name)
        if not version.isdigit():
            raise ConfigError(f"{text!r}: version {version!r} is not a number (models:/<name>/<version>)")
        return ModelUri(uri, "version", name=name, version=version)
    if uri.startswith(RUNS_SCHEME):
        run_id, _, path = uri[len(RUNS_SCHEME):].strip("/").partition("/")
        if not run_id:
            raise ConfigError(f"{text!r} names no run: give runs:/<run_id>/model")
        return ModelUri(uri, "run", run_id=run_id, path=path)
    return ModelUri(uri, "path", path=uri.removeprefix("file://"))


def version_uri(name: str, version: str | int) -> str:
    """The URI that always loads this one version (never an alias: aliases move)."""
    return f"{MODELS_SCHEME}{name}/{version}"


def registered_version(model_uri: str) -> tuple[str, str]:
    """``models:/name@alias`` or ``models:/name/3`` -> (name, version); ("", "") otherwise or unknown."""
    try:
        parsed = parse_model_uri(model_uri)
    except ConfigError:
        return "", ""
    if not parsed.registered:
        return "", ""
    client = MlflowClient()
    try:
        if parsed.kind == "alias":
            return parsed.name, str(client.get_model_version_by_alias(parsed.name, parsed.alias).version)
        if parsed.kind == "version":
            return parsed.name, parsed.version
        versions = client.search_model_versions(f"name='{parsed.name}'", max_results=1, order_by=["version_number DESC"])
        return parsed.name, str(versions[0].version) if versions else ""
    except MlflowException as err:
        log.debug("could not resolve the registered version of %s: %s", model_uri, err)
    return "", ""


def describe_what_exists(model_uri: str) -> str:
    """Best effort: what the URI could have pointed at (registered models, a run's models, a folder)."""
    try:
        parsed = parse_model_uri(model_uri)
        client = mlflow.MlflowClient()
        if parsed.kind == "logged":
            return "no logged model with that id in the tracking store"
        if parsed.registered:
            models = client.search_registered_models(max_results=50)
            if parsed.name not in {m.name for m in models}:
                names = sorted(m.name for m in models)
                return f"registered models: {names or 'none'}"
            versions = client.search_model_versions(f"name='{parsed.name}'", max_results=50)
            aliases = sorted({a for m in models if m.name == parsed.name for a in (m.aliases or {})})
            return (
                f"versions of {parsed.name!r}: {sorted(int(v.version) for v in versions)}, aliases: {aliases or 'none'}"
            )
        if parsed.kind == "run":
            try:
                run = client.get_run(parsed.run_id)
            except MlflowException:
                return f"no run {parsed.run_id!r} in the tracking store {redact(mlflow.get_tracking_uri())}"
            logged = [m.name for m in mlflow.search_logged_models(
                experiment_ids=[run.info.experiment_id],
                filter_string=f"source_run_id = '{parsed.run_id}'",
                output_format="list",
            )]
            return f"models logged by run {parsed.run_id}: {logged or 'none'}"
        path = Path(parsed.path)
        if not path.exists():
            return f"the path {path} does not exist"
        if not (path / "MLmodel").exists():
            return f"{path} has no MLmodel file (contents: {sorted(p.name for p in path.iterdir())[:20]})"
    except Exception as exc:  # the description is a courtesy: never mask the real error with it
        return f"could not list what exists ({type(exc).__name__}: {exc})"
    return "see the tracking store"


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from, as far as the tracking store knows ("" when unknown)."""

    model_uri: str
    model_id: str = ""
    source_run_id: str = ""
    train_run_id: str = ""
    dataset_digest: str = ""
    registered_name: str = ""
    version: str = ""

    def label(self) -> str:
        """A short human name: ``cxr-covid-cnn v3``, ``run 01234567`` or the logged model's id."""
        if self.registered_name:
            return self.registered_name + (f" v{self.version}" if self.version else "")
        if self.train_run_id or self.source_run_id:
            return f"run {(self.train_run_id or self.source_run_id)[:8]}"
        return self.model_id or "model"


def describe_model(model_uri: str) -> ModelSource:
    """What the tracking store knows about ``model_uri``: ids, training run and data digest.
    """
    try:
        info = mlflow.models.get_model_info(model_uri)
    except (MlflowException, OSError) as err:
        log.warning("no model metadata for %s (%s)", model_uri, err)
        return ModelSource(model_uri=model_uri)
    serving_meta = (info.metadata or {}).get(SERVING_METADATA_KEY, {}) or {}
    name, version = registered_version(model_uri)
    source_run = info.run_id or ""
    return ModelSource(
        model_uri=model_uri,
        model_id=str(getattr(info, "model_id", "") or ""),
        source_run_id=source_run,
        train_run_id=str(serving_meta.get(META_TRAIN_RUN_KEY) or source_run),
        dataset_digest=str(serving_meta.get(META_DIGEST_KEY) or ""),
        registered_name=name,
        version=version,
    )


__all__ = [
    "ModelSource",
    "ModelUri",
    "URI_FORMS",
    "describe_model",
    "describe_what_exists",
    "parse_model_uri",
    "registered_version",
    "version_uri",
]
