"""Passwords stay out of URLs, params, tags, logs and messages (pure: no MLflow, no Optuna).

MLflow stores every ``-P`` value of ``mlflow run`` as typed, in the run's params, where anyone with
read access to the tracking store sees it. So a storage URL that carries a password is refused, and
the message names the ways PostgreSQL users already keep passwords elsewhere: ``PGPASSWORD``,
``~/.pgpass``, a service file (libpq reads all three when the URL has no password), or the whole
URL in the environment variable :data:`STORAGE_ENV`, which cxrexp reads but never logs. Every URL
cxrexp shows goes through :func:`redact`; :func:`scrub` removes any password known from the
environment from a text before it is printed (the CLI's last line of defence).
"""

from __future__ import annotations

import os

from cxrexp.errors import ConfigError

# The whole Optuna storage URL, password included, for -P storage= left empty.
STORAGE_ENV = "CXREXP_OPTUNA_STORAGE"
# Environment variables whose value is, or holds, a secret that must never be shown.
_SECRET_VARIABLES = ("PGPASSWORD", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
_URL_VARIABLES = (STORAGE_ENV, "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
_HIDDEN = "***"


def _parsed(url: str):
    from sqlalchemy.engine import (
        make_url,  # SQLAlchemy's parser: the one Optuna and MLflow use too
    )

    return make_url(url)


def url_password(url: str) -> str | None:
    """The password inside ``url`` (``scheme://user:password@host/...``), or None."""
    try:
        return _parsed(url).password or None
    except Exception:  # not a SQLAlchemy URL (file paths, http://): look for user:password@ by hand
        head, sep, _ = url.partition("@")
        if not sep or "://" not in head:
            return None
        userinfo = head.split("://", 1)[1]
        return userinfo.split(":", 1)[1] if ":" in userinfo else None


def redact(url: str) -> str:
    """``url`` with its password as ``***`` (for tags, params and messages)."""
    password = url_password(url)
    if not password:
        return url
    try:
        return _parsed(url).render_as_string(hide_password=True)
    except Exception:  # not SQLAlchemy's syntax: say nothing about it rather than leak it
        return url.replace(password, _HIDDEN)


def refuse_password(url: str, flag: str) -> None:
    """ConfigError when ``url`` (given as ``flag``) carries a password; the message says where it goes instead."""
    if not url_password(url):
        return
    run_id = os.environ.get("MLFLOW_RUN_ID")
    stored = (
        f" `mlflow run` has already stored the value in the params of run {run_id}: delete that run "
        f"(`mlflow runs delete --run-id {run_id}`, then `mlflow gc` to purge it) and change the password."
        if run_id else ""
    )
    raise ConfigError(
        f"{flag}={redact(url)} carries a password, and MLflow stores every -P value as typed in the run's "
        "params. Keep it out of the URL: export PGPASSWORD, or add a line host:port:database:user:password "
        "to ~/.pgpass (mode 0600), or name a service from ~/.pg_service.conf "
        "(postgresql+psycopg2:///?service=NAME), or put the whole URL in the environment variable "
        f"{STORAGE_ENV} and leave {flag} empty." + stored
    )


def known_secrets(environ: dict[str, str] | None = None) -> list[str]:
    """Every secret the environment holds: the secret variables' values and the URL variables' passwords."""
    environ = dict(os.environ if environ is None else environ)
    found = [environ[name] for name in _SECRET_VARIABLES if environ.get(name)]
    found += [p for p in (url_password(environ[name]) for name in _URL_VARIABLES if environ.get(name)) if p]
    return sorted(set(found), key=len, reverse=True)  # longest first: one secret may contain another


def scrub(text: str, secrets: list[str] | None = None) -> str:
    """``text`` with every secret (default: ``known_secrets()`` of the environment) replaced by ``***``."""
    for secret in known_secrets() if secrets is None else secrets:
        if len(secret) >= 4:  # a one-letter "password" would blank out half the message
            text = text.replace(secret, _HIDDEN)
    return text


__all__ = ["STORAGE_ENV", "known_secrets", "redact", "refuse_password", "scrub", "url_password"]
