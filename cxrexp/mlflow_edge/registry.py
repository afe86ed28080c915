"""The Model Registry edge: registering models, moving aliases, recording promotion decisions.

Aliases only, never the deprecated stages API. The aliases of one registered model:

``challenger``
    set by ``train`` on every new version: awaiting a promotion decision.
``champion``
    the version that is served (``models:/<name>@champion``).
``previous-champion``
    the champion before the current one: what ``rollback`` restores.
``rolled-back``
    the last champion taken down by ``rollback`` (kept findable, never served).

``promote`` moves the old champion to ``previous-champion`` and the winner to ``champion``, records on
the winner which version it replaced (tag ``promotion.replaced``), and REMOVES the ``challenger``
alias from the winner: ``challenger`` means "awaiting a decision", and a promoted version is decided
(a refused challenger keeps its alias, so it can be judged again under other gates).

``rollback`` points ``champion`` back at ``previous-champion``; the demoted version gets the
``rolled-back`` alias and the tag ``promotion.rolled_back``; ``previous-champion`` then moves one step
further back, to the version the restored champion had itself replaced (its ``promotion.replaced``
tag), or is removed when there is none. So rollbacks walk back through the promotion history, and a
second accidental ``rollback`` never brings the bad model back.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient

from cxrexp.credentials import redact
from cxrexp.errors import RegistryError
from cxrexp.promotion import Decision
from cxrexp.tags import (
    CHALLENGER,
    CHAMPION,
    DECIDED_AT_TAG,
    DECISION_TAG,
    PREVIOUS_CHAMPION,
    PROMOTED_AT_TAG,
    PROMOTION_TAG_PREFIX,
    REASONS_TAG,
    REPLACED_TAG,
    ROLLED_BACK,
    ROLLED_BACK_TAG,
)

log = logging.getLogger(__name__)

class AliasMoved(RegistryError):
    """An alias changed between reading the evidence and moving it: the decision is about stale facts."""


class NothingToRollBack(RegistryError):
    """``rollback`` found no ``previous-champion`` to restore."""


@dataclass(frozen=True)
class AliasMove:
    """What an alias operation changed: ``moves`` are ``(alias, from_version|None, to_version|None)``."""

    name: str
    moves: tuple[tuple[str, str | None, str | None], ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def changed(self) -> bool:
        return any(before != after for _, before, after in self.moves)

    def describe(self) -> list[str]:
        """One plain line per alias that changed: ``@champion: version 1 -> version 2``."""

        def show(version: str | None) -> str:
            return "(none)" if version is None else f"version {version}"

        lines = [f"@{alias}: {show(before)} -> {show(after)}" for alias, before, after in self.moves if before != after]
        return lines + list(self.notes)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def register(model_uri: str, name: str, *, alias: str | None = CHALLENGER, tags: dict[str, Any] | None = None) -> str:
    """Register ``model_uri`` as a new version of ``name`` and point ``alias`` at it (None: no alias);
    returns the version."""
    clean_tags = {k: str(v) for k, v in (tags or {}).items() if v is not None}
    version = mlflow.register_model(model_uri, name, tags=clean_tags)
    if alias is not None:
        MlflowClient().set_registered_model_alias(name, alias, version.version)
    log.info("registered %s as %s version %s%s", model_uri, name, version.version, f" (@{alias})" if alias else "")
    return str(version.version)


def alias_moves_forward(current: str | None, new: str) -> bool:
    """Whether pointing an alias now at ``current`` to version ``new`` moves it forward (or nowhere).

    Versions are numbered in registration order, so a lower one is an older model: a re-run of an
    old study, or a late worker, must not take ``@challenger`` back from a newer model.
    """
    return current is None or int(new) >= int(current)


def point_alias_forward(name: str, alias: str, version: str) -> bool:
    """Point ``alias`` of ``name`` at ``version`` unless that moves it back; returns whether it now does."""
    client = MlflowClient()
    try:
        current: str | None = str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        current = None
    if not alias_moves_forward(current, version):
        return False
    client.set_registered_model_alias(name, alias, version)
    return True


def keep_first_version(name: str, versions: list[str]) -> str:
    """Of several versions registered for the same model (two machines at once), keep the first and
    delete the others; returns the one kept. Every racer computes the same answer, so they converge."""
    keep = str(min(int(v) for v in versions))
    client = MlflowClient()
    for version in versions:
        if version != keep:
            try:
                client.delete_model_version(name, version)
            except MlflowException:  # the other machine deleted it first
                pass
    return keep


def aliases(name: str) -> dict[str, str]:
    """``{alias: version}`` of the registered model ``name``; ``RegistryError`` when there is no such model."""
    client = MlflowClient()
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
        names = sorted(m.name for m in client.search_registered_models(max_results=100))
        raise RegistryError(
            f"no registered model named {name!r} in {redact(mlflow.get_tracking_uri())} "
            f"(registered models: {', '.join(names) or 'none'}); train one first, or check --registered-model-name"
        ) from None
    return {alias: str(version) for alias, version in sorted((model.aliases or {}).items())}


def describe_aliases(name: str) -> str:
    """``"challenger -> 3, champion -> 2"`` (or ``"none"``), for messages."""
    found = aliases(name)
    return ", ".join(f"{alias} -> {version}" for alias, version in found.items()) or "none"


def get_alias_version(name: str, alias: str) -> ModelVersion | None:
    """The version ``name@alias`` points at; None when the alias (or the model) does not exist."""
    try:
        version = aliases(name).get(alias)
    except RegistryError:
        return None
    if version is None:
        return None
    return MlflowClient().get_model_version(name, version)


def _set_alias(client: MlflowClient, name: str, alias: str, version: str | None) -> None:
    if version is None:
        client.delete_registered_model_alias(name, alias)
    else:
        client.set_registered_model_alias(name, alias, version)


UNCHECKED = object()  # promote(expected_champion=...) not given: the champion is not re-checked


def _describe(version) -> str:
    return "(none)" if version is None else f"version {version}"


def promote(
    name: str,
    version: str,
    *,
    champion_alias: str = CHAMPION,
    previous_alias: str = PREVIOUS_CHAMPION,
    challenger_alias: str | None = CHALLENGER,
    expected_champion: object = UNCHECKED,
) -> AliasMove:
    """Make ``version`` the champion: old champion -> ``previous_alias``, winner -> ``champion_alias``.

    ``expected_champion``: the champion version the decision was made against (None: there was none).
    The alias is read again just before it moves; when it points elsewhere now (another promote, a
    person in the UI), nothing moves and ``AliasMoved`` says what changed. ``UNCHECKED`` skips the check.

    The winner is tagged with the version it replaced (``promotion.replaced``, empty when there was
    no champion) so that ``rollback`` can walk back. ``challenger_alias`` is removed from the winner
    (None keeps it). With no old champion, ``previous_alias`` is left as it is. Promoting the current
    champion again changes nothing.
    """
    version = str(version)
    client = MlflowClient()
    before = aliases(name)
    old_champion = before.get(champion_alias)
    if expected_champion is not UNCHECKED and old_champion != (None if expected_champion is None else str(expected_champion)):
        raise AliasMoved(
            f"{name}@{champion_alias} moved while promote was deciding: it was "
            f"{_describe(expected_champion)} when the evidence was read and is {_describe(old_champion)} now; "
            "nothing was moved: run promote again to decide against the current champion"
        )
    if expected_champion is not UNCHECKED and challenger_alias and before.get(challenger_alias) != version:
        raise AliasMoved(
            f"{name}@{challenger_alias} moved while promote was deciding: it was version {version} when the "
            f"evidence was read and is {_describe(before.get(challenger_alias))} now; nothing was moved: run "
            "promote again to decide on the current challenger"
        )
    if old_champion == version:
        return AliasMove(name, notes=(f"version {version} already is @{champion_alias}: nothing moved",))
    client.get_model_version(name, version)  # fails with MLflow's message if the version does not exist
    moves: list[tuple[str, str | None, str | None]] = []
    # Order for crash safety: previous first, so champion never points at nothing and no version is lost.
    if old_champion is not None:
        _set_alias(client, name, previous_alias, old_champion)
        moves.append((previous_alias, before.get(previous_alias), old_champion))
    _set_alias(client, name, champion_alias, version)
    moves.append((champion_alias, old_champion, version))
    client.set_model_version_tag(name, version, REPLACED_TAG, old_champion or "")
    client.set_model_version_tag(name, version, PROMOTED_AT_TAG, _now())
    if challenger_alias and before.get(challenger_alias) == version:
        _set_alias(client, name, challenger_alias, None)
        moves.append((challenger_alias, version, None))
    log.info("promoted %s version %s to @%s (was %s)", name, version, champion_alias, old_champion)
    return AliasMove(name, tuple(moves))


def rollback(
    name: str,
    *,
    champion_alias: str = CHAMPION,
    previous_alias: str = PREVIOUS_CHAMPION,
    rolled_back_alias: str = ROLLED_BACK,
) -> AliasMove:
    """Restore ``previous_alias`` as champion (see the module docstring for where the others go).

    Raises ``NothingToRollBack`` (naming the aliases that exist) when there is no previous champion.
    """
    client = MlflowClient()
    before = aliases(name)
    restored = before.get(previous_alias)
    current = before.get(champion_alias)
    if restored is None:
        raise NothingToRollBack(
            f"{name} has no @{previous_alias} alias: nothing to roll back to "
            f"(aliases: {describe_aliases(name)}). A previous champion exists only after a promotion replaced one."
        )
    if restored == current:
        raise NothingToRollBack(
            f"{name}@{previous_alias} and @{champion_alias} are both version {current}: nothing to roll back to"
        )
    restored_version = client.get_model_version(name, restored)
    # One step further back: the version the restored champion replaced when it was promoted.
    further_back = (restored_version.tags or {}).get(REPLACED_TAG) or None
    if further_back is not None:
        try:
            client.get_model_version(name, further_back)
        except MlflowException:
            further_back = None  # deleted since: nothing to point at
    if further_back in (restored, current):
        further_back = None

    moves: list[tuple[str, str | None, str | None]] = []
    _set_alias(client, name, champion_alias, restored)
    moves.append((champion_alias, current, restored))
    if current is not None:
        _set_alias(client, name, rolled_back_alias, current)
        moves.append((rolled_back_alias, before.get(rolled_back_alias), current))
        client.set_model_version_tag(name, current, ROLLED_BACK_TAG, _now())
    _set_alias(client, name, previous_alias, further_back)
    moves.append((previous_alias, restored, further_back))
    log.info("rolled %s back from version %s to version %s", name, current, restored)
    return AliasMove(name, tuple(moves))


def decision_tags(decision: Decision, *, outcome: str | None = None) -> dict[str, str]:
    """The model-version tags that record ``decision``: ``promotion.decision``, ``.reasons``, ``.<gate>``.

    ``outcome`` overrides the recorded word (default ``promoted`` / ``refused``).
    """
    tags = {
        DECISION_TAG: outcome or ("promoted" if decision.promote else "refused"),
        REASONS_TAG: "\n".join(decision.reasons),
    }
    for gate, values in decision.gate_values.items():
        parts = ["pass" if values["passed"] else "fail"]
        for key in ("value", "limit"):
            if values.get(key) is not None:
                parts.append(f"{key}={values[key]:.6g}")
        tags[f"{PROMOTION_TAG_PREFIX}{gate}"] = " ".join(parts)
    return tags


def record_decision(name: str, version: str, decision: Decision, *, extra_tags: dict[str, Any] | None = None) -> dict[str, str]:
    """Write the decision as tags on model version ``version``; returns the tags written."""
    tags = decision_tags(decision)
    tags[DECIDED_AT_TAG] = _now()
    tags.update({f"{PROMOTION_TAG_PREFIX}{k}": str(v) for k, v in (extra_tags or {}).items() if v is not None})
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)
    return tags


__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "PREVIOUS_CHAMPION",
    "ROLLED_BACK",
    "AliasMove",
    "AliasMoved",
    "NothingToRollBack",
    "RegistryError",
    "aliases",
    "decision_tags",
    "describe_aliases",
    "get_alias_version",
    "promote",
    "record_decision",
    "register",
    "rollback",
]
