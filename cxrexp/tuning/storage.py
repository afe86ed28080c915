"""Where studies live: Optuna RDB storages, and opening (or resuming) a study safely.

A study remembers the dataset digest and the base settings its trials ran with, so resuming it with
other data or settings fails instead of mixing incomparable trials.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from typing import Any, Callable, Iterator

import optuna
from optuna.trial import TrialState

from cxrexp import credentials
from cxrexp.config import TrainConfig, flat_params
from cxrexp.credentials import redact
from cxrexp.data.store import PreparedDataError, PreparedDataset
from cxrexp.tuning.locks import SCHEMA_LOCK_KEY, advisory_lock
from cxrexp.tuning.pruning import make_pruner
from cxrexp.tuning.sampling import TrialSeededTPE
from cxrexp.tuning.space import SEARCHED_FIELDS
from cxrexp.tuning.stale import RetryStaleTrial

DEFAULT_STORAGE = "sqlite:///optuna.db"
SQLITE_TIMEOUT_S = 60  # several worker processes write one sqlite file: wait for the lock, do not fail
DONE_STATES = (TrialState.COMPLETE, TrialState.PRUNED)

# Trial values depend on the base settings except these: resuming a study with other values would
# mix incomparable trials. (Searched fields and run management may differ between invocations.)
MANAGEMENT_FIELDS = (
    "data", "n_trials", "study_name", "storage", "pruner", "n_jobs", "trial_timeout", "heartbeat", "stale_after",
    "system_metrics", "registered_model_name",
)


# The two below subclass PreparedDataError, which the CLI reports as a user error (message, exit 2):
# like a dataset that cannot train the model, they are settings to fix before anything runs.
class StudyMismatch(PreparedDataError):
    """An existing study of that name was run on other data or with other base settings."""


class StorageError(PreparedDataError):
    """The Optuna storage URL cannot be opened (bad URL, missing driver, server down)."""


def storage_url(cfg: TrainConfig) -> str:
    """``-P storage``, else the environment's ``CXREXP_OPTUNA_STORAGE`` (which may hold a password: it
    is never logged), else ``sqlite:///optuna.db``. A password inside ``-P storage`` is refused
    (``credentials.refuse_password``): MLflow has stored that value in the run's params."""
    if cfg.storage:
        credentials.refuse_password(cfg.storage, "-P storage")
        return cfg.storage
    return os.environ.get(credentials.STORAGE_ENV) or DEFAULT_STORAGE


def rdb_url(url: str) -> str:
    """``url`` with a PostgreSQL driver that is installed.

    SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3; with only psycopg2 installed that
    fails, so such URLs get ``postgresql+psycopg2://``. Other URLs pass unchanged.
    """
    import importlib.util

    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # not SQLAlchemy's syntax: let RDBStorage report it
        return url
    if parsed.drivername == "postgresql" and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        return parsed.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
    return url


def make_storage(url: str, heartbeat: int = 0, stale_after: int = 0) -> optuna.storages.RDBStorage:
    """An Optuna RDB storage; sqlite gets a long lock timeout so several processes can share it.

    With ``heartbeat`` (seconds), every trial run through it records a heartbeat that often, and a
    RUNNING trial silent for ``stale_after`` seconds is failed and retried (``stale.RetryStaleTrial``)
    whenever a trial starts on this storage, from any process or machine.
    """
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    beating: dict[str, Any] = {}
    if heartbeat:
        beating = {"heartbeat_interval": int(heartbeat), "grace_period": int(stale_after),
                   "heartbeat_stale_trial_callback": RetryStaleTrial()}
    driver_url = rdb_url(url)
    try:
        with _schema_lock(driver_url), warnings.catch_warnings():  # heartbeat: "experimental" in Optuna 5
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return _created(lambda: optuna.storages.RDBStorage(driver_url, engine_kwargs=engine_kwargs, **beating))
    except Exception as err:  # SQLAlchemy/driver errors: say which storage and what to do
        raise StorageError(
            f"cannot open the Optuna storage {redact(url)!r}: {type(err).__name__}: {err}. Pass --storage with an "
            "RDB URL Optuna supports (sqlite:///optuna.db, postgresql://user@host:5432/db, mysql://...)"
        ) from err


SCHEMA_RETRIES = 5


@contextlib.contextmanager
def _schema_lock(url: str) -> Iterator[None]:
    """On PostgreSQL, hold a session advisory lock while Optuna creates (or checks) its tables.

    Why: RDBStorage runs ``CREATE TABLE`` / ``CREATE TYPE`` when the tables are missing, and two
    machines doing so on a fresh database at the same moment collide (``UniqueViolation ...
    pg_type_typname_nsp_index``): one of them died before its first trial. Under the lock the second
    one finds the tables made. Other databases pass through (``_created`` retries there).
    """
    if not url.startswith("postgresql"):
        yield
        return
    with advisory_lock(url, SCHEMA_LOCK_KEY):
        yield


def _created(make: Callable[[], optuna.storages.RDBStorage]) -> optuna.storages.RDBStorage:
    """``make()``, again after a short wait when another process was creating the same tables."""
    import sqlalchemy.exc

    for attempt in range(SCHEMA_RETRIES):
        try:
            return make()
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.OperationalError):
            if attempt == SCHEMA_RETRIES - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def defining_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The base settings a study's trial values depend on (JSON-able)."""
    return {k: v for k, v in flat_params(cfg).items() if k not in SEARCHED_FIELDS + MANAGEMENT_FIELDS}


def open_study(cfg: TrainConfig, dataset: PreparedDataset, *, create: bool = True) -> optuna.Study:
    """Create or load ``cfg.study_name`` in ``storage_url(cfg)`` (maximising) with TPE seeded per trial.

    The first invocation records the dataset digest and the defining base settings in the study's
    user attrs; a later one with other values raises ``StudyMismatch`` (mixing them would compare
    trials that are not comparable).
    """
    url = storage_url(cfg)
    storage = make_storage(url, cfg.heartbeat, cfg.stale_after)
    pruner = make_pruner(cfg.pruner, cfg.epochs)
    if create:
        study = optuna.create_study(
            storage=storage, study_name=cfg.study_name, direction="maximize", load_if_exists=True, pruner=pruner,
        )
    else:
        study = optuna.load_study(study_name=cfg.study_name, storage=storage, pruner=pruner)
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise StudyMismatch(
            f"study {cfg.study_name!r} in {redact(url)} minimises; cxrexp maximises {cfg.objective}: use another --study-name"
        )
    wanted = {"dataset_digest": dataset.digest, "image_size": dataset.image_size, "settings": defining_settings(cfg)}
    have = study.user_attrs
    if create and not have.get("dataset_digest"):
        for key, value in wanted.items():
            study.set_user_attr(key, value)
    elif have.get("dataset_digest"):
        changed = [k for k in ("dataset_digest", "image_size") if have.get(k) != wanted[k]]
        old_settings = have.get("settings", {})
        changed += [
            f"{k} ({old_settings.get(k)!r} -> {v!r})"
            for k, v in wanted["settings"].items()
            if k in old_settings and str(old_settings[k]) != str(v)
        ]
        if changed:
            raise StudyMismatch(
                f"study {cfg.study_name!r} in {redact(url)} already holds trials run with other "
                f"{', '.join(changed)}: resuming would compare trials that are not comparable; use a new --study-name"
            )
    study.sampler = TrialSeededTPE(cfg.seed)  # per trial: distinct on every worker and machine (sampling.py)
    return study


def count_done(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=DONE_STATES))
