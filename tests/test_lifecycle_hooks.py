"""The stage hooks around a stage body, as docs/plugins.md describes them (no flows, no MLflow: fast)."""

from __future__ import annotations

import pytest

import clipforge
from clipforge.core.context import RunContext
from clipforge.core.results import EvaluateResult
from clipforge.core.storage import Store
from clipforge.flows.stage import run_stage


class Watcher:
    def __init__(self, name, calls, fail_before=False):
        self.name, self.calls, self.fail_before = name, calls, fail_before

    @clipforge.hookimpl
    def before_stage(self, stage, context):
        self.calls.append((self.name, "before", stage))
        if self.fail_before:
            raise RuntimeError("not today")

    @clipforge.hookimpl
    def after_stage(self, stage, context, result):
        self.calls.append((self.name, "after", stage, result, context.state.as_dict()))

    @clipforge.hookimpl
    def on_stage_error(self, stage, context, error):
        self.calls.append((self.name, "error", stage, str(error)))


@pytest.fixture
def ctx(tiny_recipe, tmp_path, fresh_plugins):
    pm = fresh_plugins()
    store = Store(str(tmp_path / "store"))
    return RunContext(recipe=clipforge.load_recipe(tiny_recipe), store=store, run_id="r1", plugins=pm)


def test_after_stage_gets_the_result_once_it_is_saved(ctx):
    calls = []
    ctx.plugins.add_plugin(Watcher("w", calls), "w")
    result = EvaluateResult(metrics={"eval/retrieval/mean_recall@1": 0.5}, metrics_uri="m.json")

    def body():
        assert calls == [("w", "before", "evaluate")]
        return result

    assert run_stage(ctx, "evaluate", body) is result
    saved = {"evaluate": result.model_dump(mode="json")}
    assert saved["evaluate"]["metrics"] == {"eval/retrieval/mean_recall@1": 0.5}
    assert calls[1] == ("w", "after", "evaluate", result, saved)
    assert ctx.store.read_json("runs/r1/run.json")["state"] == saved


def test_every_on_stage_error_runs_then_the_error_is_reraised(ctx):
    calls = []
    ctx.plugins.add_plugin(Watcher("a", calls), "a")
    ctx.plugins.add_plugin(Watcher("b", calls), "b")

    def body():
        raise ValueError("bad batch")

    with pytest.raises(ValueError, match="bad batch"):
        run_stage(ctx, "train", body)
    assert sorted(c for c in calls if c[1] == "error") == [
        ("a", "error", "train", "bad batch"),
        ("b", "error", "train", "bad batch"),
    ]
    assert not [c for c in calls if c[1] == "after"] and ctx.state.train is None


def test_a_failing_before_stage_stops_the_stage_without_on_stage_error(ctx):
    calls = []
    ctx.plugins.add_plugin(Watcher("w", calls, fail_before=True), "w")
    ran = []
    with pytest.raises(RuntimeError, match="not today"):
        run_stage(ctx, "evaluate", lambda: ran.append(True))
    assert ran == [] and calls == [("w", "before", "evaluate")]
