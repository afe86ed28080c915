"""The user-facing error types: problems a user can fix, reported as one line and exit code 2.

Every exception that carries a message for the user (a bad path, an unknown class, a model URI that
resolves to nothing, a study with no finished trial) subclasses :class:`UserError`, so ``cxrexp.cli``
catches exactly one type and never has to know which module raised it. Errors about a single file
(``ImageRejected``, a bad request row) are not here: they are reasons recorded per file or per row
while the run goes on. This module imports nothing from cxrexp.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix: printed as ``cxrexp <step>: error: <message>``, exit 2, no traceback."""


class ConfigError(UserError, ValueError):
    """A flag value that cannot work; the message names the flag and the accepted values."""


class DatasetError(UserError, ValueError):
    """The dataset folder cannot be used as asked; the message names the path and the fix."""


class PreparedDataError(UserError, ValueError):
    """A prepared dataset is missing, incomplete or unusable; the message says how to fix it."""


class WorkerDied(UserError, RuntimeError):
    """A worker process died abruptly (out of memory, a kill signal); the message says which images were
    in flight and what to try. Nothing half-done is kept."""


class ModelNotFound(UserError, ValueError):
    """A model URI that resolves to nothing usable; the message names the URI and what exists."""


class SegmenterUnavailable(UserError, ValueError):
    """A lung view was asked for and no segmenter fits the data; the message lists what to pass."""


class StudyFailed(UserError, RuntimeError):
    """The study has no COMPLETE trial, so there is no model to register."""


class RegistryError(UserError, ValueError):
    """A registry operation that cannot be done as asked (no such model, alias or version)."""


__all__ = ["ConfigError", "DatasetError", "ModelNotFound", "PreparedDataError", "RegistryError", "SegmenterUnavailable", "StudyFailed", "UserError", "WorkerDied"]
