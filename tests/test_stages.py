"""The stage table is the one place a stage lives: results, the retrain's sequence, ``--stage`` and the docs follow it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from clipforge.core.errors import StageError
from clipforge.core.results import CurateResult, EvaluateResult, RegisterResult, StepCounts, TrainResult
from clipforge.core.stages import STAGES, Stage, StageResults, stage_of

ROOT = Path(__file__).resolve().parents[1]


def render_stage_table() -> str:
    """docs/architecture.md's stage table, as the table in clipforge/core/stages.py gives it."""
    rows = [
        f"| `{s.name}` | {', '.join(f'`{n}`' for n in s.needs) or '—'} | `{s.result.__name__}` | {s.does} |"
        for s in STAGES.values()
    ]
    return "\n".join(["| stage | needs | hands on | does |", "|---|---|---|---|", *rows])


def test_the_docs_stage_table_is_the_one_in_core():
    text = (ROOT / "docs/architecture.md").read_text()
    block = re.search(r"<!-- stages: [^\n]*-->\n(.*?)\n<!-- /stages -->", text, re.S)
    assert block, "docs/architecture.md has no generated stage table (<!-- stages: ... --> ... <!-- /stages -->)"
    assert block.group(1) == render_stage_table(), f"regenerate docs/architecture.md's stage table:\n{render_stage_table()}"


def test_run_stage_choices_are_the_table():
    from clipforge.cli import build_parser

    parser = build_parser()
    run = next(a for a in parser._subparsers._group_actions if a.dest == "command").choices["run"]  # type: ignore[union-attr]
    stage = next(a for a in run._actions if a.dest == "stage")
    assert stage.choices == ["all", *STAGES]


def test_every_row_has_a_flow_that_takes_the_run_id_and_the_store():
    from clipforge.flows.stage import stage_flow_of

    for name in STAGES:
        flow = stage_flow_of(name)
        assert flow.name == name
        assert list(flow.parameters.properties) == ["run_id", "storage"]


def test_each_row_needs_only_stages_before_it():
    order = list(STAGES)
    for i, stage in enumerate(STAGES.values()):
        assert set(stage.needs) <= set(order[:i]), stage
        assert stage_of(stage.result) is stage


def test_a_body_that_disagrees_with_its_row_is_refused():
    from clipforge.flows.stage import stage_flow

    def evaluate(ctx, trained: CurateResult) -> EvaluateResult:  # evaluate takes a TrainResult
        raise AssertionError("never runs")

    with pytest.raises(TypeError, match=r"takes \(ctx, TrainResult\) and returns a EvaluateResult"):
        stage_flow("evaluate")(evaluate)


def _curated(kept: int) -> CurateResult:
    return CurateResult(
        out="curated/k", input=kept + 1, kept=kept, parts=1, funnel={"decode": StepCounts(seen=kept + 1, kept=kept)},
        shards=[], manifest="curated/k/manifest.parquet", manifest_uri="/s/curated/k/manifest.parquet",
        content_hash="h", seconds=1.0,
    )  # fmt: skip


@given(kept=st.integers(0, 10**9), metrics=st.dictionaries(st.text(min_size=1), st.floats(allow_nan=False), max_size=5))
def test_results_round_trip_through_run_json_typed(kept, metrics):
    state = StageResults()
    state.set("curate", _curated(kept))
    state.set("evaluate", EvaluateResult(metrics=metrics, metrics_uri="m.json"))
    back = StageResults.from_dict(state.as_dict())
    assert back.done() == ["curate", "evaluate"]  # in the table's order, whatever the order they were set in
    assert back.get(CurateResult) == state.curate and back.evaluate.metrics == metrics
    assert back.train is None and back.get(TrainResult) is None


def test_a_result_of_the_wrong_type_or_a_missing_input_is_a_clear_error():
    state = StageResults()
    with pytest.raises(TypeError, match="the train stage hands on a TrainResult, not a CurateResult"):
        state.set("train", _curated(1))
    with pytest.raises(
        StageError, match=r"run r1 has no train output yet; run the train stage first .*--stage train --run-id r1"
    ):
        state.require("evaluate", "train", "r1")
    with pytest.raises(AttributeError, match="the stages: curate, train, evaluate, register"):
        _ = state.export


class ExportResult(BaseModel):
    model: str


@pytest.mark.slow
def test_a_new_row_and_its_body_are_a_new_stage_of_the_retrain(tiny_recipe, tracking, prefect_server, monkeypatch):
    """An ``export`` stage after train: a row in the table and a decorated body; nothing else changes.
    (The other stages' bodies are stand-ins here: what is checked is the hand-over.)"""
    from clipforge.cli import build_parser
    from clipforge.flows import retrain_flow, stage

    monkeypatch.setitem(STAGES, "export", Stage("export", ExportResult, ("train",), "the model -> an export"))
    monkeypatch.setattr(stage, "STAGE_FLOWS", {})
    ran: list[tuple[str, object]] = []
    trained = TrainResult(steps=1, epochs=1, pairs=2, final_loss=None, samples_per_s=None, seconds=0.1, checkpoint="c",
                          model="runs/x/train/model", model_uri="/m", device="cpu", precision="fp32")  # fmt: skip

    @stage.stage_flow("curate")
    def curate(ctx) -> CurateResult:
        ran.append(("curate", ()))
        return _curated(3)

    @stage.stage_flow("train")
    def train(ctx, curated: CurateResult) -> TrainResult:
        ran.append(("train", curated.kept))
        return trained

    @stage.stage_flow("evaluate")
    def evaluate(ctx, model: TrainResult) -> EvaluateResult:
        ran.append(("evaluate", model.model))
        return EvaluateResult(metrics={"eval/x": 1.0}, metrics_uri="m.json")

    @stage.stage_flow("register")
    def register(ctx, model: TrainResult, evaluated: EvaluateResult) -> RegisterResult:
        ran.append(("register", evaluated.metrics))
        return RegisterResult(model_name="m", version="1", promoted=True, previous_champion=None, model_uri="models:/m/1",
                              metric=None, value=None, reason="first")  # fmt: skip

    @stage.stage_flow("export")
    def export(ctx, model: TrainResult) -> ExportResult:
        ran.append(("export", (model.model, ctx.state.register.version)))
        return ExportResult(model=f"{model.model}.onnx")

    result = retrain_flow(tiny_recipe, tracking_uri=tracking)
    assert ran == [("curate", ()), ("train", 3), ("evaluate", trained.model), ("register", {"eval/x": 1.0}),
                   ("export", (trained.model, "1"))]  # fmt: skip
    assert result.export == ExportResult(model="runs/x/train/model.onnx") and result.done() == [*STAGES]
    run = next(a for a in build_parser()._subparsers._group_actions if a.dest == "command").choices["run"]  # type: ignore[union-attr]
    assert next(a for a in run._actions if a.dest == "stage").choices == ["all", *STAGES]
