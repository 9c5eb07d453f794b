"""The one MLflow client: one per tracking URI, each call retried alone, an operation retried whole."""

from __future__ import annotations

from unittest import mock

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mlflow import MlflowClient

from clipforge.registry import client as client_module
from clipforge.registry.client import ATTEMPTS, mlflow_client, tracked


@pytest.fixture
def no_delay(monkeypatch):
    monkeypatch.setattr(client_module, "BASE_DELAY", 0.0)


def failing(times: int, error: Exception, calls: list[str], name: str):
    """A function that raises ``error`` its first ``times`` calls, recording each call in ``calls``."""

    def fn() -> str:
        calls.append(name)
        if calls.count(name) <= times:
            raise error
        return name

    return fn


def test_one_client_per_tracking_uri(tracking, tmp_path, monkeypatch):
    assert mlflow_client() is mlflow_client()
    first = mlflow_client()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    assert mlflow_client() is not first
    assert mlflow_client().tracking_uri.endswith("other.db")


def test_a_client_call_is_retried_on_a_transient_error_only(tracking, no_delay, monkeypatch):
    calls = []
    real = MlflowClient.search_experiments

    def flaky(self, *args, **kwargs):
        calls.append("search")
        if len(calls) == 1:
            raise ConnectionError("tracking server restarting")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "search_experiments", flaky)
    assert [e.name for e in mlflow_client().search_experiments()] == ["Default"]
    assert calls == ["search", "search"]

    def broken(self, *args, **kwargs):
        calls.append("search")
        raise ValueError("a bad filter")

    calls.clear()
    monkeypatch.setattr(MlflowClient, "search_experiments", broken)
    with pytest.raises(ValueError, match="a bad filter"):
        mlflow_client().search_experiments()
    assert calls == ["search"]


@given(failures=st.integers(min_value=0, max_value=2 * ATTEMPTS))
def test_an_operation_is_retried_whole_and_its_calls_not_again_inside(failures):
    calls: list[str] = []
    first = failing(0, ConnectionError("reset"), calls, "first")
    second = failing(failures, ConnectionError("reset"), calls, "second")
    with mock.patch.object(client_module, "BASE_DELAY", 0.0):
        retried_call = tracked(second)  # what a client call inside the operation is wrapped in

        @tracked
        def operation() -> str:
            first()
            return retried_call()

    attempts = min(failures + 1, ATTEMPTS)
    if failures < ATTEMPTS:
        assert operation() == "second"
    else:
        with pytest.raises(ConnectionError):
            operation()
    # every attempt of the operation ran both calls once: no retry of the inner call on its own
    assert calls == ["first", "second"] * attempts


def _integrity_error() -> Exception:
    import sqlite3

    from mlflow.exceptions import MlflowException

    try:
        try:
            raise sqlite3.IntegrityError("UNIQUE constraint failed: datasets.experiment_id, datasets.name, datasets.digest")
        except sqlite3.IntegrityError as e:
            raise MlflowException(str(e)) from e
    except MlflowException as e:
        return e


@pytest.mark.parametrize(
    ("errors", "calls", "raised"),
    [
        ([], 1, None),
        (["race"], 2, None),  # the concurrent insert lost: linked on the second call
        (["race", "race"], 2, "UNIQUE"),  # a second refusal is no race: it goes on
        (["other"], 1, "bad dataset"),  # any other refusal is not retried
    ],
)
def test_log_inputs_tries_once_more_only_after_losing_an_insert_race(monkeypatch, errors, calls, raised):
    from mlflow.exceptions import MlflowException

    from clipforge.registry import tracking

    made: list[str] = []

    class Client:
        def log_inputs(self, run_id, inputs):
            made.append(run_id)
            if len(made) <= len(errors):
                raise _integrity_error() if errors[len(made) - 1] == "race" else MlflowException("bad dataset")

    monkeypatch.setattr(tracking, "mlflow_client", Client)
    if raised:
        with pytest.raises(MlflowException, match=raised):
            tracking.log_inputs("r", [])
    else:
        tracking.log_inputs("r", [])
    assert made == ["r"] * calls
