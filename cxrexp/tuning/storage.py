"""Where studies live: Optuna RDB storages, and opening (or resuming) a study safely.

A study remembers the dataset digest and the base settings its trials ran with, so resuming it with
other data or settings fails instead of mixing incomparable trials.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from cxrexp import credentials
from cxrexp.config import TrainConfig, flat_params
from cxrexp.credentials import redact
from cxrexp.data.store import PreparedDataError, PreparedDataset
from cxrexp.tuning.pruning import make_pruner
from cxrexp.tuning.space import SEARCHED_FIELDS
from cxrexp.tuning.stale import RetryStaleTrial

DEFAULT_STORAGE = "sqlite:///optuna.db"
SQLITE_TIMEOUT_S = 60  # several worker processes write one sqlite file: wait for the lock, do not fail
DONE_STATES = (TrialState.COMPLETE, TrialState.PRUNED)

# Trial values depend on the base settings except these: resuming a study with other values would
# mix incomparable trials. (Searched fields and run management may differ between invocations.)
MANAGEMENT_FIELDS = (
    "data", "n_trials", "study_name", "storage", "pruner", "n_jobs", "trial_timeout", "heartbeat", "stale_after",
    "registered_model_name",
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
    try:
        with warnings.catch_warnings():  # the heartbeat is "experimental" in Optuna 5 (since 2.9)
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(rdb_url(url), engine_kwargs=engine_kwargs, **beating)
    except Exception as err:  # SQLAlchemy/driver errors: say which storage and what to do
        raise StorageError(
            f"cannot open the Optuna storage {redact(url)!r}: {type(err).__name__}: {err}. Pass --storage with an "
            "RDB URL Optuna supports (sqlite:///optuna.db, postgresql://user@host:5432/db, mysql://...)"
        ) from err


def sampler_seed(seed: int, n_existing_trials: int, worker: int) -> int:
    """``seed`` for a fresh study's only worker; otherwise a value derived from all three.

    A resumed study or a second worker seeded with ``seed`` itself would redraw the very
    parameters of the first trials (TPE's start-up trials are random draws from the seeded RNG).
    """
    if n_existing_trials == 0 and worker == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(n_existing_trials), int(worker)]).generate_state(1)[0])


def defining_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The base settings a study's trial values depend on (JSON-able)."""
    return {k: v for k, v in flat_params(cfg).items() if k not in SEARCHED_FIELDS + MANAGEMENT_FIELDS}


def open_study(cfg: TrainConfig, dataset: PreparedDataset, *, worker: int = 0, create: bool = True) -> optuna.Study:
    """Create or load ``cfg.study_name`` in ``storage_url(cfg)`` (maximising) with the seeded TPE sampler.

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
    n_existing = len(study.get_trials(deepcopy=False))
    study.sampler = optuna.samplers.TPESampler(seed=sampler_seed(cfg.seed, n_existing, worker))
    return study


def count_done(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=DONE_STATES))
