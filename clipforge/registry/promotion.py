"""Model versions and the aliases that point at them: ``challenger`` (newest) and ``champion`` (best).

Each version carries its evaluation metrics as tags ``metric.<name>`` (names through
:func:`~clipforge.core.metrics.metric_key`), so promotion compares versions without
reading runs. Every move of ``champion`` records on the new champion ``promoted_by``,
``promotion_reason``, ``promoted_at`` and ``previous_champion`` (the version it displaced),
which is what :func:`rollback` walks back.

Concurrency: MLflow has no compare-and-set on aliases. Two mechanisms keep two promotions
racing each other from leaving the worse version champion:

- a file lock keyed on the registry URI and model name serializes the processes that share its
  folder (one machine, or several when ``CLIPFORGE_LOCK_DIR`` is on a shared filesystem);
- across machines, every move of ``champion`` first claims the registered model's tag
  ``clipforge.champion_generation`` (the generation read plus one, with a random token) and
  re-reads it; the alias is written only while the decision is fresh (younger than half of
  :data:`SETTLE_S`), and after :data:`SETTLE_S` the promoter re-reads alias and generation: if
  another promoter claimed a later generation, it waits for the champion to settle and decides
  again against whoever holds it. On a tracking server this closes the race as long as a request
  reaches the server within ``SETTLE_S / 2`` of being sent (see docs/registry.md).
"""

from __future__ import annotations

import getpass
import hashlib
import logging
import math
import os
import random
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlparse

import mlflow
from filelock import FileLock, Timeout
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

from clipforge.core.bootstrap import RESAMPLES, Interval, paired_interval
from clipforge.core.components import PerSample
from clipforge.core.errors import ConfigError, StageError
from clipforge.core.metrics import eval_name, metric_key
from clipforge.registry.client import mlflow_client, tracked
from clipforge.registry.report import direction

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
METRIC_TAG_PREFIX = "metric."
#: How long a promotion waits for another one on the same model before giving up.
LOCK_TIMEOUT_S = 300.0
#: How many times an alias move is re-read and redone before giving up.
MAX_ROUNDS = 5
#: The registered-model tag holding ``<generation>:<token>`` of the last move of ``champion``.
GENERATION_TAG = "clipforge.champion_generation"
#: On a remote registry: how long a promoter waits after moving ``champion`` before it checks that
#: no other promoter moved it meanwhile; a decision older than half of it is taken again.
SETTLE_S = 2.0


class PromotionError(ConfigError):
    """A promotion or rollback that cannot be decided: a missing metric, version or predecessor."""


@tracked
def register_version(
    model_uri: str,
    name: str,
    *,
    tags: dict[str, str],
    metrics: dict[str, float],
    run_id: str | None,
    await_ready_s: int = 300,
    description: str = "",
    model_id: str | None = None,
) -> ModelVersion:
    """Register ``model_uri`` as a new version of ``name`` and point ``challenger`` at it.

    The version is tagged with ``tags`` (lineage) and each metric as ``metric.<name>``, and described
    by ``description``; ``model_id`` is the logged model it comes from (by default read from a
    ``models:/m-<id>`` URI).
    ``challenger`` moves only forward, so with concurrent registrations it ends on the newest.
    Registering the same logged model of the same run again returns the version it already has.
    """
    client = mlflow_client()
    _ensure_registered_model(client, name)
    version_tags = {k: str(v) for k, v in tags.items()}
    version_tags.update({METRIC_TAG_PREFIX + metric_key(k): repr(float(v)) for k, v in metrics.items()})
    # a retried call whose first attempt reached the registry finds that version instead of adding one
    earlier = (
        [v for v in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'") if v.source == model_uri]
        if run_id
        else []
    )
    version = (
        earlier[0]
        if earlier
        else client.create_model_version(
            name,
            source=model_uri,
            run_id=run_id,
            tags=version_tags,
            await_creation_for=await_ready_s,
            description=description or None,
            model_id=model_id or _logged_model_id(model_uri),
        )
    )
    if version.status != "READY":  # the await above gives up silently when time runs out
        version = _wait_until_ready(client, name, version.version, await_ready_s)
    with _registry_lock(name):
        current = _aliases(client, name).get(CHALLENGER)
        if current is None or int(current) < int(version.version):
            client.set_registered_model_alias(name, CHALLENGER, version.version)
    return client.get_model_version(name, version.version)


#: A version's metrics as measured on the evaluation data of the promotion at hand (metric name -> value).
MetricsOf = Callable[[str], dict[str, float]]
#: What decides a promotion against the champion of the moment (None when there is none): (better, reason).
Decision = Callable[[str | None], tuple[bool, str]]


#: A version's per-sample results on the evaluation data of the promotion at hand (metric name -> PerSample).
SamplesOf = Callable[[str], dict[str, PerSample]]
#: A guard: ``(metric, max_drop)``, or ``(metric, max_drop, confidence)`` to judge the drop by its interval.
GuardRule = tuple[str, float] | tuple[str, float, float | None]


@dataclass(frozen=True)
class Judgement:
    """A promotion's decision against one champion: whether it should move, why, and the primary
    metric's paired-bootstrap interval (with a confidence)."""

    better: bool
    reason: str
    champion: str | None
    interval: Interval | None = None
    guard: str = ""


@tracked
def promote_if_better(
    name: str,
    version: str,
    *,
    metric: str,
    mode: str = "max",
    min_delta: float = 0.0,
    guards: Sequence[GuardRule] = (),
    metrics_of: MetricsOf | None = None,
    confidence: float | None = None,
    samples_of: SamplesOf | None = None,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> tuple[bool, str | None]:
    """Make ``version`` champion if it beats the champion on ``metric``; return (promoted, previous champion).

    It beats the champion when its metric is higher (``mode="max"``) or lower (``mode="min"``)
    by strictly more than ``min_delta``, and loses no guarded metric (``guards``: ``(metric,
    max_drop)``) by more than its budget, or when there is no champion. ``metrics_of(v)`` gives
    version ``v``'s metrics measured on the same evaluation data as this version's: the retrain
    flow evaluates the champion again when its own numbers came from other data; by default a
    version's ``metric.*`` tags are read. Metric names are looked up with and without the
    ``eval/`` prefix. A missing metric raises :class:`PromotionError` (a misnamed rule must not go
    unnoticed). NaN counts as the worst value. The decision is recorded in the version's tag
    ``promotion_reason`` (and, when a guard refused it, ``promotion_guard``); a version that
    already is champion gives ``(True, None)``.

    With ``confidence``, the metric must win beyond noise: the lower bound of a seeded paired
    bootstrap (:func:`~clipforge.core.bootstrap.paired_interval`) of challenger minus champion, over
    the samples both were measured on (``samples_of(v)``: a version's per-sample results), must
    exceed ``min_delta``; a guard with a confidence refuses when its drop's upper bound passes
    its budget. A metric without per-sample results raises :class:`PromotionError`.
    """
    if mode not in ("max", "min"):
        raise PromotionError(f"promotion mode must be 'max' or 'min', not {mode!r}")
    client = mlflow_client()
    version = str(version)
    judge = judge_promotion(
        name, version, metric=metric, mode=mode, min_delta=min_delta, guards=guards, metrics_of=metrics_of,
        confidence=confidence, samples_of=samples_of, resamples=resamples, seed=seed,
    )  # fmt: skip

    def decide(champion: str | None) -> tuple[bool, str]:
        judged = judge(champion)
        return judged.better, judged.reason

    _get_version(client, name, version)
    return _promote(client, name, version, decide)


def judge_promotion(
    name: str,
    version: str,
    *,
    metric: str,
    mode: str = "max",
    min_delta: float = 0.0,
    guards: Sequence[GuardRule] = (),
    metrics_of: MetricsOf | None = None,
    confidence: float | None = None,
    samples_of: SamplesOf | None = None,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Callable[[str | None], Judgement]:
    """What :func:`promote_if_better` decides against a given champion (None: there is none), without
    moving anything: the register flow asks it before a person approves."""
    if mode not in ("max", "min"):
        raise PromotionError(f"promotion mode must be 'max' or 'min', not {mode!r}")
    version = str(version)
    metrics = metrics_of or (lambda v: tagged_metrics(name, v))
    candidate = metrics(version)
    rules = [(g[0], g[1], g[2] if len(g) > 2 else None) for g in guards]
    if (confidence is not None or any(c is not None for _, _, c in rules)) and samples_of is None:
        raise PromotionError("a promotion with a confidence needs the versions' per-sample results (samples_of)")

    def judge(champion: str | None) -> Judgement:
        incumbent = None if champion is None else metrics(champion)
        spread = None
        if champion is not None and samples_of is not None:
            spread = _spread(samples_of(version), samples_of(champion), champion, resamples, seed)
        return _verdict(metric, candidate, champion, incumbent, mode, min_delta, guards, confidence, spread)

    return judge


@tracked
def promote_first_version(name: str, version: str) -> tuple[bool, str | None]:
    """Without a promotion rule: ``version`` takes champion only when there is none, or when the one
    there took it the same way and registered later (two first retrains at once: the first
    registered wins). Returns (promoted, previous champion)."""
    client = mlflow_client()
    version = str(version)

    def decide(champion: str | None) -> tuple[bool, str]:
        if champion is None:
            return True, "first version of the model"
        tags = client.get_model_version(name, champion).tags
        if tags.get("promotion_reason", "").startswith("first version") and int(champion) > int(version):
            return True, f"first version of the model (registered before v{champion}, which took champion first)"
        return False, "the recipe has no registry.promote rule: only a first version becomes champion automatically"

    return _promote(client, name, version, decide)


def _promote(client: MlflowClient, name: str, version: str, decide: Decision) -> tuple[bool, str | None]:
    """Move ``champion`` to ``version`` while ``decide`` says it should, safely against other promoters
    (see the module's docstring); return (promoted, previous champion)."""
    settle = _settle_s()
    fresh_for = settle / 2 if settle else math.inf
    with _registry_lock(name):
        previous: str | None = None
        moves = retries = 0
        waited_on: str | None = None
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while moves < MAX_ROUNDS and time.monotonic() < deadline:
            read_at = time.monotonic()
            champion, generation = _champion_state(client, name)
            if champion == version:
                # our move held, unless a later claim is still in flight: a claim unchanged for a
                # whole settle period is void (its owner would have moved within half of it)
                if not settle or generation.endswith(f":{version}") or generation == waited_on:
                    return True, previous
                waited_on = generation
                time.sleep(settle)
                continue
            better, reason = decide(champion)
            if not better:
                log.info("%s v%s %s", name, version, reason)
                _tag(client, name, version, promotion_reason=reason, **_guard_tag(reason))
                return False, champion
            fresh_until = read_at + fresh_for
            if not _claimed_and_moved(client, name, version, champion, generation, reason, fresh_until):
                # another promoter claimed the generation, or our decision went stale: back off
                retries += 1
                time.sleep(random.uniform(0, settle / 4 * 2 ** min(retries, 4)))
                continue
            previous = champion
            moves += 1
            time.sleep(settle)  # lets a racing promoter's write land before we re-read
    raise PromotionError(f"{name}: champion kept moving while v{version} was being promoted; try again")


def _claimed_and_moved(
    client: MlflowClient, name: str, version: str, champion: str | None, generation: str, reason: str, fresh_until: float
) -> bool:
    """Claim the next generation and move ``champion``; False when another promoter got in first.

    Two writes of the alias at once can also collide in the registry's database (a unique
    constraint): the other promoter got in first as well.
    """
    try:
        return _claim_generation(client, name, generation, version) and _move_champion(
            client, name, version, champion, reason=reason, user=f"auto:{_whoami()}", fresh_until=fresh_until
        )
    except MlflowException as e:
        if "UNIQUE constraint" in str(e) or "IntegrityError" in str(e) or "Duplicate entry" in str(e):
            return False
        raise


@tracked
def set_champion(name: str, version: str, *, reason: str, user: str | None = None) -> str | None:
    """Make ``version`` champion by hand, recording who and why; return the previous champion.

    When ``version`` already is champion nothing changes and it is returned.
    """
    version = str(version)
    client = mlflow_client()
    _get_version(client, name, version)
    with _registry_lock(name):
        champion, generation = _champion_state(client, name)
        if champion != version:
            _claim_generation(client, name, generation, version)  # automatic promoters in flight notice it
            user = user or _whoami()
            _move_champion(client, name, version, champion, reason=reason, user=user)
            when = datetime.now(timezone.utc).isoformat()[:16]
            _restate(
                client,
                name,
                version,
                f"**Champion** (promoted by hand by {user}, {when} UTC; was v{champion or 'none'}): {reason}.",
            )
            if champion is not None:
                _restate(
                    client,
                    name,
                    champion,
                    f"**No longer champion** (v{version} promoted by hand by {user}, {when} UTC): {reason}.",
                )
        return champion


def rollback(name: str, *, reason: str = "rollback", user: str | None = None) -> str:
    """Move ``champion`` back to the version it displaced (its ``previous_champion`` tag); return it.

    Rolling back again walks further back. The rolled-back-to version keeps its own
    ``previous_champion``, so a rollback is not itself undone by the next one. Each of its calls
    is retried alone, never the whole: a rollback that went through, run again, would walk back
    once more.
    """
    client = mlflow_client()
    with _registry_lock(name):
        try:
            champion = _aliases(client, name).get(CHAMPION)
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise PromotionError(f"the registry has no model {name!r} to roll back") from e
            raise
        if champion is None:
            raise PromotionError(f"{name} has no champion to roll back")
        target = client.get_model_version(name, champion).tags.get("previous_champion")
        if not target:
            raise PromotionError(f"{name}: champion v{champion} has no previous champion to roll back to")
        _get_version(client, name, target)
        _claim_generation(client, name, _champion_state(client, name)[1], target)
        client.set_registered_model_alias(name, CHAMPION, target)
        user = user or _whoami()
        now = datetime.now(timezone.utc).isoformat()
        _tag(client, name, target, promoted_by=user, promotion_reason=f"{reason} (from v{champion})", promoted_at=now)
        client.set_model_version_tag(name, champion, "rolled_back", reason)
        _restate(client, name, target, f"**Champion again** (rolled back from v{champion} by {user}, {now[:16]} UTC): {reason}.")
        _restate(client, name, champion, f"**Rolled back** (champion is v{target} again; by {user}, {now[:16]} UTC): {reason}.")
        return target


@tracked
def champion_version(name: str) -> str | None:
    """The version holding ``champion``; None when there is none, or no such registered model yet."""
    try:
        return _aliases(mlflow_client(), name).get(CHAMPION)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


@tracked
def champion_metrics(name: str) -> dict[str, float] | None:
    """The champion's tagged metrics (keys through ``metric_key``), or None without a champion."""
    champion = _aliases(mlflow_client(), name).get(CHAMPION)
    return None if champion is None else tagged_metrics(name, champion)


def _move_champion(
    client: MlflowClient,
    name: str,
    version: str,
    champion: str | None,
    *,
    reason: str,
    user: str,
    fresh_until: float = math.inf,
) -> bool:
    """Tag ``version`` with who/why, then point ``champion`` at it, unless the decision is stale by then."""
    # tags first: whoever sees the alias move also sees why it moved
    tags = {"promoted_by": user, "promotion_reason": reason, "promoted_at": datetime.now(timezone.utc).isoformat()}
    if champion is not None:
        tags["previous_champion"] = champion
    _tag(client, name, version, **tags)
    if time.monotonic() > fresh_until:
        return False
    client.set_registered_model_alias(name, CHAMPION, version)
    log.info("%s: champion v%s -> v%s (%s)", name, champion, version, reason)
    return True


#: The interval of (challenger - champion) on a metric at a confidence.
Spread = Callable[[str, float], Interval]


def _spread(ours: dict[str, PerSample], theirs: dict[str, PerSample], champion: str, resamples: int, seed: int) -> Spread:
    """The paired-bootstrap interval of a metric between the challenger and ``champion``, computed once each."""
    found: dict[tuple[str, float], Interval] = {}

    def record(results: dict[str, PerSample], metric: str, who: str) -> PerSample:
        by_key = {metric_key(k): v for k, v in results.items()}
        for name in dict.fromkeys([metric, eval_name(metric)]):
            if metric_key(name) in by_key:
                return by_key[metric_key(name)]
        have = ", ".join(sorted(results)) or "none"
        raise PromotionError(
            f"{metric!r} has no per-sample results for {who}, so no confidence interval can be drawn: its evaluator does "
            f"not report them (clipforge.ReportsPerSample), or it is an aggregate; metrics with them: {have}"
        )

    def spread(metric: str, confidence: float) -> Interval:
        if (metric, confidence) not in found:
            a, b = record(theirs, metric, f"champion v{champion}"), record(ours, metric, "the challenger")
            try:
                found[metric, confidence] = paired_interval(a, b, confidence, resamples=resamples, seed=seed)
            except ValueError as e:
                raise PromotionError(f"{metric!r}: {e}") from None
        return found[metric, confidence]

    return spread


def _verdict(
    metric: str,
    candidate: dict[str, float],
    champion: str | None,
    incumbent: dict[str, float] | None,
    mode: str,
    min_delta: float,
    guards: Sequence[GuardRule],
    confidence: float | None = None,
    spread: Spread | None = None,
) -> Judgement:
    """Whether the candidate takes champion, and why (NaN counts as the worst value)."""
    rules = [(g[0], g[1], g[2] if len(g) > 2 else None) for g in guards]
    ours = metric_of(candidate, metric, "the challenger")
    if math.isnan(ours):
        return Judgement(False, f"not promoted: {metric} is NaN", champion)
    if incumbent is None or champion is None:
        return Judgement(True, f"first champion ({metric}={_num(ours)})", champion)
    theirs = metric_of(incumbent, metric, f"champion v{champion}")
    margin = ours - theirs if mode == "max" else theirs - ours
    against = f"champion v{champion} ({metric}={_num(theirs)}) by more than {min_delta} ({mode})"
    interval = None
    if confidence is not None and spread is not None:
        interval = spread(metric, confidence)
        low = interval.low if mode == "max" else -interval.high  # the gain's lower bound
        if not low > min_delta:
            return Judgement(
                False,
                f"not promoted: {metric}={_num(ours)} against {against}: delta {interval.describe()}, "
                f"whose lower bound {low:+.4g} does not exceed {min_delta}: the gain may be noise",
                champion,
                interval,
            )
        against += f", delta {interval.describe()}"
    elif not (math.isnan(theirs) or margin > min_delta):
        return Judgement(False, f"not promoted: {metric}={_num(ours)} does not beat {against}", champion)
    refused = []
    for guard, budget, sure in rules:
        drop = _drop(guard, candidate, incumbent)
        before, after = metric_of(incumbent, guard, "the champion"), metric_of(candidate, guard, "the challenger")
        if sure is not None and spread is not None and not math.isnan(after):
            iv = spread(guard, sure)
            upper = iv.high if direction(guard) == "min" else -iv.low  # the drop's upper bound
            if upper > budget:
                refused.append(
                    f"{guard} may drop by up to {upper:.4g} ({_num(before)} -> {_num(after)}, delta {iv.describe()}), more than {budget}"
                )
        elif drop > budget:
            refused.append(f"{guard} dropped by {drop:.4g} ({_num(before)} -> {_num(after)}), more than {budget}")
    if refused:
        reason = f"not promoted: {GUARD_REFUSED} " + "; ".join(refused) + f" (it beats {against} on {metric})"
        return Judgement(False, reason, champion, interval, _guard_tag(reason).get("promotion_guard", ""))
    beats = f"{metric}={_num(ours)} beats {against}" + (f"; every guard within its budget ({len(guards)})" if guards else "")
    return Judgement(True, beats, champion, interval)


def _num(value: float) -> str:
    """A metric in a reason a person reads: six significant digits, not float32's noise."""
    return f"{value:.6g}"


#: How a refusal by a guard begins, for :func:`_guard_tag` to find the guard in the reason.
GUARD_REFUSED = "guard"


def _drop(guard: str, candidate: dict[str, float], incumbent: dict[str, float]) -> float:
    """How much worse the candidate is on ``guard``: lower, or higher where lower is better; NaN is worst."""
    ours, theirs = metric_of(candidate, guard, "the challenger"), metric_of(incumbent, guard, "the champion")
    if math.isnan(ours):
        return math.inf
    return ours - theirs if direction(guard) == "min" else theirs - ours


def _guard_tag(reason: str) -> dict[str, str]:
    """``promotion_guard``: the guard(s) that refused a promotion and by how much, from its reason."""
    prefix = f"not promoted: {GUARD_REFUSED} "
    return {"promotion_guard": reason[len(prefix) :].split(" (it beats")[0]} if reason.startswith(prefix) else {}


def metric_of(metrics: dict[str, float], metric: str, who: str) -> float:
    """``metric`` of ``metrics``, with or without the ``eval/`` prefix, ``@`` or ``_at_``; else PromotionError naming ``who``."""
    by_key = {metric_key(k): v for k, v in metrics.items()}
    for candidate in dict.fromkeys([metric, eval_name(metric)]):
        if metric_key(candidate) in by_key:
            return float(by_key[metric_key(candidate)])
    raise PromotionError(f"{who} has no metric {metric!r}; it has: {', '.join(sorted(metrics)) or 'none'}")


def tagged_metrics(name: str, version: str) -> dict[str, float]:
    """The metrics a version carries as ``metric.*`` tags (keys as tagged, through ``metric_key``)."""
    tags = _get_version(mlflow_client(), name, str(version)).tags
    return {k[len(METRIC_TAG_PREFIX) :]: float(v) for k, v in tags.items() if k.startswith(METRIC_TAG_PREFIX)}


def _champion_state(client: MlflowClient, name: str) -> tuple[str | None, str]:
    """The champion version and the generation tag, from one read of the registered model."""
    model = client.get_registered_model(name)
    aliases = {alias: str(v) for alias, v in model.aliases.items()}
    return aliases.get(CHAMPION), model.tags.get(GENERATION_TAG, "0")


def _claim_generation(client: MlflowClient, name: str, seen: str, version: str) -> bool:
    """Write generation ``seen + 1`` for ``version`` and read it back: False when another claim won."""
    number = int(seen.split(":", 1)[0] or 0) + 1
    token = f"{number}:{uuid.uuid4().hex[:12]}:{version}"
    client.set_registered_model_tag(name, GENERATION_TAG, token)
    return client.get_registered_model(name).tags.get(GENERATION_TAG) == token


def _settle_s() -> float:
    """:data:`SETTLE_S` on a remote registry; none on a local one, where the file lock serializes."""
    return SETTLE_S if urlparse(mlflow.get_registry_uri()).scheme in ("http", "https", "databricks") else 0.0


def _aliases(client: MlflowClient, name: str) -> dict[str, str]:
    # one read of all aliases: get_model_version_by_alias reports a missing alias as
    # INVALID_PARAMETER_VALUE, indistinguishable from other bad input
    return {alias: str(version) for alias, version in client.get_registered_model(name).aliases.items()}


def _get_version(client: MlflowClient, name: str, version: str) -> ModelVersion:
    try:
        return client.get_model_version(name, version)
    except MlflowException as e:
        raise PromotionError(f"{name} has no version {version!r}: {e.message}") from e


def _restate(client: MlflowClient, name: str, version: str, verdict: str) -> None:
    """The version description's first paragraph (whether it is champion, and why) replaced by ``verdict``;
    the rest (what changed since the champion it was weighed against) kept."""
    description = _get_version(client, name, version).description or ""
    _, sep, rest = description.partition("\n\n")
    client.update_model_version(name, version, description=verdict + (sep + rest if sep else ""))


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
