"""Model versions and the aliases that point at them: ``challenger`` (newest) and ``champion`` (best).

Each version carries its evaluation metrics as tags ``metric.<name>`` (names through
:func:`~clipforge.registry.tracking.metric_key`), so promotion compares versions without
reading runs. Every move of ``champion`` records on the new champion ``promoted_by``,
``promotion_reason``, ``promoted_at`` and ``previous_champion`` (the version it displaced),
which is what :func:`rollback` walks back.

Concurrency: MLflow has no compare-and-set on aliases, so every alias move happens under a
file lock keyed on the registry URI and model name, and is re-read and re-checked after it is
written. The lock serializes processes that share its folder: one machine, or several when
``CLIPFORGE_LOCK_DIR`` points at a shared filesystem. Processes that do not share it are only
protected by the re-check, which narrows the race but cannot close it.
"""

from __future__ import annotations

import getpass
import hashlib
import logging
import math
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import mlflow
from filelock import FileLock, Timeout
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

from clipforge.core.errors import ConfigError, StageError
from clipforge.registry.tracking import metric_key

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
METRIC_TAG_PREFIX = "metric."
#: How long a promotion waits for another one on the same model before giving up.
LOCK_TIMEOUT_S = 300.0
#: How many times an alias move is re-read and redone before giving up.
MAX_ROUNDS = 5


class PromotionError(ConfigError):
    """A promotion or rollback that cannot be decided: a missing metric, version or predecessor."""


def register_version(
    model_uri: str,
    name: str,
    *,
    tags: dict[str, str],
    metrics: dict[str, float],
    run_id: str | None,
    await_ready_s: int = 300,
) -> ModelVersion:
    """Register ``model_uri`` as a new version of ``name`` and point ``challenger`` at it.

    The version is tagged with ``tags`` (lineage) and each metric as ``metric.<name>``.
    ``challenger`` moves only forward, so with concurrent registrations it ends on the newest.
    """
    client = MlflowClient()
    _ensure_registered_model(client, name)
    version_tags = {k: str(v) for k, v in tags.items()}
    version_tags.update({METRIC_TAG_PREFIX + metric_key(k): repr(float(v)) for k, v in metrics.items()})
    version = client.create_model_version(
        name,
        source=model_uri,
        run_id=run_id,
        tags=version_tags,
        await_creation_for=await_ready_s,
        model_id=_logged_model_id(model_uri),
    )
    if version.status != "READY":  # the await above gives up silently when time runs out
        version = _wait_until_ready(client, name, version.version, await_ready_s)
    with _registry_lock(name):
        current = _aliases(client, name).get(CHALLENGER)
        if current is None or int(current) < int(version.version):
            client.set_registered_model_alias(name, CHALLENGER, version.version)
    return client.get_model_version(name, version.version)


def promote_if_better(
    name: str, version: str, *, metric: str, mode: str = "max", min_delta: float = 0.0
) -> tuple[bool, str | None]:
    """Make ``version`` champion if it beats the champion on ``metric``; return (promoted, previous champion).

    It beats the champion when its metric is higher (``mode="max"``) or lower (``mode="min"``)
    by strictly more than ``min_delta``, or when there is no champion. ``metric`` is looked up
    with and without the ``eval/`` prefix. A candidate whose metric is missing raises
    :class:`PromotionError` (a misnamed ``registry.promote.metric`` must not go unnoticed), and so
    does a champion without it (promote by hand with :func:`set_champion`). NaN counts as the
    worst value. The decision is recorded in the version's tag ``promotion_reason``; a version
    that already is champion gives ``(True, None)``.
    """
    if mode not in ("max", "min"):
        raise PromotionError(f"promotion mode must be 'max' or 'min', not {mode!r}")
    version = str(version)
    client = MlflowClient()
    with _registry_lock(name):
        candidate = _metric_of(_get_version(client, name, version), metric)
        previous: str | None = None
        for _ in range(MAX_ROUNDS):
            champion = _aliases(client, name).get(CHAMPION)
            if champion == version:  # our last write held
                return True, previous
            incumbent = None if champion is None else _metric_of(client.get_model_version(name, champion), metric)
            better, reason = _verdict(metric, candidate, champion, incumbent, mode, min_delta)
            if not better:
                log.info("%s v%s %s", name, version, reason)
                client.set_model_version_tag(name, version, "promotion_reason", reason)
                return False, champion
            _move_champion(client, name, version, champion, reason=reason, user=f"auto:{_whoami()}")
            previous = champion
    raise PromotionError(f"{name}: champion kept moving while v{version} was being promoted; try again")


def set_champion(name: str, version: str, *, reason: str, user: str | None = None) -> str | None:
    """Make ``version`` champion by hand, recording who and why; return the previous champion.

    When ``version`` already is champion nothing changes and it is returned.
    """
    version = str(version)
    client = MlflowClient()
    _get_version(client, name, version)
    with _registry_lock(name):
        champion = _aliases(client, name).get(CHAMPION)
        if champion != version:
            _move_champion(client, name, version, champion, reason=reason, user=user or _whoami())
        return champion


def rollback(name: str, *, reason: str = "rollback", user: str | None = None) -> str:
    """Move ``champion`` back to the version it displaced (its ``previous_champion`` tag); return it.

    Rolling back again walks further back. The rolled-back-to version keeps its own
    ``previous_champion``, so a rollback is not itself undone by the next one.
    """
    client = MlflowClient()
    with _registry_lock(name):
        champion = _aliases(client, name).get(CHAMPION)
        if champion is None:
            raise PromotionError(f"{name} has no champion to roll back")
        target = client.get_model_version(name, champion).tags.get("previous_champion")
        if not target:
            raise PromotionError(f"{name}: champion v{champion} has no previous champion to roll back to")
        _get_version(client, name, target)
        client.set_registered_model_alias(name, CHAMPION, target)
        _tag(client, name, target, promoted_by=user or _whoami(), promotion_reason=f"{reason} (from v{champion})")
        client.set_model_version_tag(name, champion, "rolled_back", reason)
        return target


def champion_version(name: str) -> str | None:
    """The version holding ``champion``; None when there is none, or no such registered model yet."""
    try:
        return _aliases(MlflowClient(), name).get(CHAMPION)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def champion_metrics(name: str) -> dict[str, float] | None:
    """The champion's metrics (keys as tagged, i.e. through ``metric_key``), or None without a champion."""
    client = MlflowClient()
    champion = _aliases(client, name).get(CHAMPION)
    if champion is None:
        return None
    tags = client.get_model_version(name, champion).tags
    return {k[len(METRIC_TAG_PREFIX) :]: float(v) for k, v in tags.items() if k.startswith(METRIC_TAG_PREFIX)}


def _move_champion(client: MlflowClient, name: str, version: str, champion: str | None, *, reason: str, user: str):
    # tags first: whoever sees the alias move also sees why it moved
    tags = {"promoted_by": user, "promotion_reason": reason, "promoted_at": datetime.now(timezone.utc).isoformat()}
    if champion is not None:
        tags["previous_champion"] = champion
    _tag(client, name, version, **tags)
    client.set_registered_model_alias(name, CHAMPION, version)
    log.info("%s: champion v%s -> v%s (%s)", name, champion, version, reason)


def _verdict(
    metric: str, candidate: float, champion: str | None, incumbent: float | None, mode: str, min_delta: float
) -> tuple[bool, str]:
    """Whether the candidate takes champion, and why (NaN counts as the worst value)."""
    if math.isnan(candidate):
        return False, f"not promoted: {metric} is NaN"
    if incumbent is None:
        return True, f"first champion ({metric}={candidate!r})"
    margin = candidate - incumbent if mode == "max" else incumbent - candidate
    against = f"champion v{champion} ({metric}={incumbent!r}) by more than {min_delta} ({mode})"
    if math.isnan(incumbent) or margin > min_delta:
        return True, f"{metric}={candidate!r} beats {against}"
    return False, f"not promoted: {metric}={candidate!r} does not beat {against}"


def _metric_of(version: ModelVersion, metric: str) -> float:
    names = [metric] if metric.startswith("eval/") else [metric, f"eval/{metric}"]
    for candidate in names:
        value = version.tags.get(METRIC_TAG_PREFIX + metric_key(candidate))
        if value is not None:
            return float(value)
    known = sorted(k[len(METRIC_TAG_PREFIX) :] for k in version.tags if k.startswith(METRIC_TAG_PREFIX))
    raise PromotionError(
        f"{version.name} v{version.version} has no metric {metric!r}; it has: {', '.join(known) or 'none'}"
    )


def _aliases(client: MlflowClient, name: str) -> dict[str, str]:
    # one read of all aliases: get_model_version_by_alias reports a missing alias as
    # INVALID_PARAMETER_VALUE, indistinguishable from other bad input
    return {alias: str(version) for alias, version in client.get_registered_model(name).aliases.items()}


def _get_version(client: MlflowClient, name: str, version: str) -> ModelVersion:
    try:
        return client.get_model_version(name, version)
    except MlflowException as e:
        raise PromotionError(f"{name} has no version {version!r}: {e.message}") from e


def _tag(client: MlflowClient, name: str, version: str, **tags: str) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise


def _logged_model_id(model_uri: str) -> str | None:
    """``m-<id>`` of a ``models:/m-<id>`` URI (a logged model), else None."""
    prefix = "models:/"
    if model_uri.startswith(prefix):
        head = model_uri[len(prefix) :].split("/", 1)[0]
        if head.startswith("m-"):
            return head
    return None


def _wait_until_ready(client: MlflowClient, name: str, version: str, timeout_s: float) -> ModelVersion:
    deadline = time.monotonic() + timeout_s
    while True:
        mv = client.get_model_version(name, version)
        if mv.status == "READY":
            return mv
        if mv.status == "FAILED_REGISTRATION" or time.monotonic() > deadline:
            raise StageError(f"{name} v{version} is {mv.status}: {mv.status_message or 'not ready in time'}")
        time.sleep(1.0)


@contextmanager
def _registry_lock(name: str) -> Iterator[None]:
    """A file lock for alias moves on model ``name`` of the current registry (see the module docstring)."""
    key = hashlib.sha256(f"{mlflow.get_registry_uri()}\0{name}".encode()).hexdigest()[:24]
    folder = Path(os.environ.get("CLIPFORGE_LOCK_DIR") or Path(tempfile.gettempdir()) / "clipforge-locks")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(folder / f"registry-{key}.lock"), timeout=LOCK_TIMEOUT_S):
            yield
    except Timeout as e:
        raise StageError(f"{name}: another promotion held the registry lock {e.lock_file} for {LOCK_TIMEOUT_S:.0f} s") from e


def _whoami() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no USER variable and no passwd entry, as in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"
