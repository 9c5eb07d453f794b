"""Rerunning a failed retrain reuses what finished; overlapping retrains of one recipe stay apart."""

from __future__ import annotations

import re
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from mlflow import MlflowClient

import clipforge
from clipforge.core.storage import Store

pytestmark = pytest.mark.slow


class Watcher:
    """Counts training steps per run; fails the evaluation while ``fail`` is set."""

    def __init__(self):
        self.steps: dict[str, int] = {}
        self.fail = False

    @clipforge.hookimpl
    def after_train_step(self, context, step, metrics):
        self.steps[context.run_id] = self.steps.get(context.run_id, 0) + 1

    @clipforge.hookimpl
    def after_evaluation(self, context, metrics):
        if self.fail:
            raise RuntimeError("the evaluation dataset is unreachable")


@pytest.fixture
def watcher(fresh_plugins):
    w = Watcher()
    fresh_plugins().add_plugin(w, "watcher")
    return w


def docs_notification_plugin() -> types.ModuleType:
    """The example plugin of docs/scheduling.md, run as it is written there."""
    text = (Path(__file__).resolve().parents[1] / "docs/scheduling.md").read_text()
    (code,) = [c for c in re.findall(r"```python\n(.*?)```", text, re.S) if "after_model_registered" in c]
    module = types.ModuleType("notify_file")
    exec(compile(code, "docs/scheduling.md", "exec"), module.__dict__)
    return module


def test_a_rerun_without_the_run_id_reuses_the_finished_curation_and_training(
    tiny_recipe, tracking, prefect_server, watcher, fresh_plugins, tmp_path, monkeypatch
):
    from clipforge.flows import retrain_flow

    monkeypatch.setenv("CLIPFORGE_NOTIFY_FILE", str(tmp_path / "notifications.log"))
    fresh_plugins().add_plugin(docs_notification_plugin(), "notify-file")

    watcher.fail = True
    with pytest.raises(RuntimeError, match="unreachable"):
        retrain_flow(tiny_recipe, tracking_uri=tracking)
    (failed_run,) = watcher.steps
    assert watcher.steps[failed_run] == 10
    client = MlflowClient()
    (failed,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert failed.info.status == "FAILED" and "unreachable" in failed.data.tags["clipforge.error"]
    assert client.search_registered_models() == []
    assert not (tmp_path / "notifications.log").exists()

    watcher.fail = False
    result = retrain_flow(tiny_recipe, tracking_uri=tracking)  # a new run, as the next scheduled try would be
    assert result.run_id != failed_run
    assert result.run_id not in watcher.steps  # not one training step this time
    assert result.curate.reused is True and result.train.reused is True
    assert result.train.model == f"runs/{failed_run}/train/model"
    assert result.register.version == "1" and result.register.promoted is True
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["clipforge.train_reused_from"].endswith(f"runs/{failed_run}/train")
    assert "figures/loss_curve.png" in {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    (line,) = (tmp_path / "notifications.log").read_text().splitlines()
    assert line.endswith(f"tiny-clip version 1 is the new champion (run {result.run_id})")

    # other training settings: a training of their own
    changed = {**tiny_recipe, "train": {**tiny_recipe["train"], "lr": 5e-4}}
    again = retrain_flow(changed, tracking_uri=tracking)
    assert again.train.reused is False and watcher.steps[again.run_id] == 10


def test_two_retrains_of_one_recipe_at_once_do_not_corrupt_each_other(tiny_recipe, tracking, prefect_server, watcher):
    from clipforge.flows import retrain_flow

    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda _: retrain_flow(tiny_recipe, tracking_uri=tracking), range(2))
    assert a.run_id != b.run_id
    # both curated into the one shared folder (same data, same steps) and got the same content
    assert a.curate.out == b.curate.out
    assert a.curate.content_hash == b.curate.content_hash
    store = Store(tiny_recipe["storage"]["root"])
    summary = store.read_json(f"{a.curate.out}/summary.json")
    assert summary["content_hash"] == a.curate.content_hash
    # every retrain registered its own version; the champion is one of them
    assert sorted([a.register.version, b.register.version]) == ["1", "2"]
    client = MlflowClient()
    champion = str(client.get_model_version_by_alias("tiny-clip", "champion").version)
    assert champion in ("1", "2")
    for r in (a, b):
        assert client.get_run(r.mlflow_run_id).info.status == "FINISHED"
        model = r.train.model
        assert store.exists(f"{model}/open_clip_model.safetensors")
    # a training that ran is in the run's own folder, never in the other's
    trained = [r for r in (a, b) if not r.train.reused]
    assert trained and all(r.train.model == f"runs/{r.run_id}/train/model" for r in trained)
    assert all(watcher.steps.get(r.run_id, 0) in (0, 10) for r in (a, b))


def test_tracking_calls_retry_transient_errors_only(tracking, prefect_server, monkeypatch):
    from clipforge.registry.tracking import finish_run

    client = MlflowClient()
    run = client.create_run(client.create_experiment("retries")).info.run_id
    calls = []
    real = MlflowClient.set_terminated

    def flaky(self, run_id, status=None, end_time=None):
        calls.append(status)
        if len(calls) == 1:
            raise ConnectionError("tracking server restarting")
        return real(self, run_id, status=status)

    monkeypatch.setattr(MlflowClient, "set_terminated", flaky)
    finish_run(run)
    assert calls == ["FINISHED", "FINISHED"] and client.get_run(run).info.status == "FINISHED"

    def broken(self, run_id, status=None, end_time=None):
        calls.append(status)
        raise ValueError("not a transient error")

    calls.clear()
    monkeypatch.setattr(MlflowClient, "set_terminated", broken)
    with pytest.raises(ValueError):
        finish_run(run)
    assert calls == ["FINISHED"]  # no retry for what retrying cannot fix


def test_tracking_calls_retry_a_locked_database_and_not_an_error_that_only_mentions_a_status(tmp_path, monkeypatch):
    import sqlite3

    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    from clipforge.registry.client import tracked

    monkeypatch.setattr("time.sleep", lambda s: None)
    holder = sqlite3.connect(tmp_path / "db.sqlite", timeout=0)
    holder.execute("create table t (x)")
    holder.commit()
    holder.execute("begin exclusive")
    calls = []

    @tracked
    def insert():
        calls.append(1)
        if len(calls) == 3:
            holder.rollback()  # the other process is done
        with sqlite3.connect(tmp_path / "db.sqlite", timeout=0) as conn:
            conn.execute("insert into t values (1)")

    insert()
    assert len(calls) == 3

    @tracked
    def missing():
        calls.append(1)
        raise MlflowException("503 Service Unavailable: no such run", error_code=RESOURCE_DOES_NOT_EXIST)

    calls.clear()
    with pytest.raises(MlflowException):
        missing()
    assert calls == [1]
