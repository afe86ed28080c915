"""Locks every machine on one Optuna storage shares: held for milliseconds, around a check-then-create.

Why: two machines that start a search at the same moment each see "nothing there yet" and each
create it: Optuna's tables on a fresh database (``storage.make_storage``), or the study's parent
run (``parent.claim_parent_run``). Under a lock the second one finds what the first made.

- PostgreSQL: a session advisory lock (``pg_advisory_lock``) on a connection of its own; it is
  released when the connection closes, so a process killed while holding it blocks nobody.
- SQLite: ``flock`` on a hidden file beside the database (``.optuna.db.lock``) (every process sharing a SQLite file is on the same
  machine); the kernel releases it with the process.
- Any other database (MySQL, ...): no lock. Creating the tables is retried instead
  (``storage._created``); two invocations started within the same second may each open a parent run
  (docs/tuning.md says so).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from pathlib import Path
from typing import Iterator

# Any fixed 64-bit number: every cxrexp process on any machine takes the same PostgreSQL advisory lock.
SCHEMA_LOCK_KEY = 0x6378726578700001


def study_lock_key(study_name: str) -> int:
    """A signed 64-bit advisory-lock key for one study (PostgreSQL's bigint), the same on every machine."""
    digest = hashlib.sha256(f"cxrexp-study:{study_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def sqlite_lock_path(url: str) -> Path | None:
    """The lock file beside a SQLite database file; None for an in-memory database or another driver."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # not SQLAlchemy's syntax: RDBStorage reports it
        return None
    if not parsed.drivername.startswith("sqlite") or parsed.database in (None, "", ":memory:"):
        return None
    database = Path(parsed.database)
    # Never the database file itself: closing any descriptor of it would drop SQLite's own POSIX locks.
    return database.with_name(f".{database.name}.lock")


@contextlib.contextmanager
def advisory_lock(url: str, key: int) -> Iterator[None]:
    """Hold PostgreSQL advisory lock ``key`` on ``url``'s database; SQLite: flock; else nothing."""
    if url.startswith("postgresql"):
        with _postgres_lock(url, key):
            yield
        return
    path = sqlite_lock_path(url)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


@contextlib.contextmanager
def _postgres_lock(url: str, key: int) -> Iterator[None]:
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
    finally:
        engine.dispose()


def study_lock(url: str, study_name: str) -> contextlib.AbstractContextManager[None]:
    """The lock for one study's check-then-create steps (its parent run)."""
    return advisory_lock(url, study_lock_key(study_name))
