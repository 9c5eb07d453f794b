"""The MLflow client that clipforge talks through, each call retried the same way, and what MLflow accepts.

A tracking server that restarts, or a SQLite store another retrain holds locked, is retried with
backoff (:func:`clipforge.core.retry.retry`, on top of MLflow's own HTTP retries) instead of
failing the run. A single call is retried alone. An operation of several calls that first looks
for what an earlier attempt created (a run, a model version) is retried as a whole
(:func:`tracked`), and its calls are then not retried again inside it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, TypeVar, cast

import mlflow
from mlflow import MlflowClient

from clipforge.core.retry import retry

F = TypeVar("F", bound=Callable[..., Any])

ATTEMPTS, BASE_DELAY = 5, 1.0
#: MLflow refuses more than this many metrics in one ``log_batch`` call.
MAX_METRICS_PER_BATCH = 1000

# set while a tracked operation runs: its attempts are the retries, not those of the calls inside
_inside: ContextVar[bool] = ContextVar("clipforge_tracked_operation", default=False)


def tracked(fn: F) -> F:
    """``fn`` retried as a whole on transient errors, the MLflow calls it makes not retried again."""
    retried = retry(attempts=ATTEMPTS, base_delay=BASE_DELAY)(fn)

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if _inside.get():
            return fn(*args, **kwargs)
        token = _inside.set(True)
        try:
            return retried(*args, **kwargs)
        finally:
            _inside.reset(token)

    return cast(F, call)


class _Retried:
    """An ``MlflowClient`` whose every method call goes through :func:`tracked`."""

    def __init__(self, client: MlflowClient) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        return tracked(attr) if callable(attr) else attr


_clients: dict[tuple[str, str], MlflowClient] = {}


def mlflow_client() -> MlflowClient:
    """The retried client of the current tracking and registry URIs, one for each pair."""
    key = (str(mlflow.get_tracking_uri()), str(mlflow.get_registry_uri()))
    if key not in _clients:
        # typed as what it wraps: every method of MlflowClient, with its signature
        _clients[key] = cast(MlflowClient, _Retried(MlflowClient(*key)))
    return _clients[key]
