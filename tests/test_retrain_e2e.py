"""A whole retrain of the tiny recipe through Prefect flows, and what MLflow holds afterwards."""

from __future__ import annotations

import io
import json

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient
from PIL import Image

import clipforge
from clipforge.core import hookspecs

pytestmark = pytest.mark.slow

LIFECYCLE = ("before_stage", "after_stage", "on_stage_error", "after_train_step", "after_evaluation", "after_model_registered")


class Recorder:
    """Records every lifecycle hook call; can make the evaluation fail once."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.fail_evaluation = False

    @clipforge.hookimpl
    def before_stage(self, stage, context):
        self.calls.append(("before_stage", stage))

    @clipforge.hookimpl
    def after_stage(self, stage, context, result):
        self.calls.append(("after_stage", stage))

    @clipforge.hookimpl
    def on_stage_error(self, stage, context, error):
        self.calls.append(("on_stage_error", stage, str(error)))

    @clipforge.hookimpl
    def after_train_step(self, context, step, metrics):
        self.calls.append(("after_train_step", step, metrics["loss"]))

    @clipforge.hookimpl
    def after_evaluation(self, context, metrics):
        self.calls.append(("after_evaluation", dict(metrics)))
        if self.fail_evaluation:
            raise RuntimeError("evaluation failed on purpose")

    @clipforge.hookimpl
    def after_model_registered(self, context, model_version):
        self.calls.append(("after_model_registered", str(model_version.version), context.state.register.promoted))

    def stages(self, hook):
        return [c[1] for c in self.calls if c[0] == hook]


@pytest.fixture
def recorder(fresh_plugins):
    rec = Recorder()
    fresh_plugins().add_plugin(rec, "recorder")
    return rec


def test_every_lifecycle_hook_is_exercised_here():
    specs = {n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), "clipforge_spec")}
    assert {n for n in specs if not n.startswith("register_")} == set(LIFECYCLE)


def test_retrain_logs_registers_and_promotes(tiny_recipe, tracking, prefect_server, recorder, tmp_path):
    from clipforge.flows import retrain_flow

    result = retrain_flow(tiny_recipe, tracking_uri=tracking)
    assert recorder.stages("before_stage") == recorder.stages("after_stage") == ["curate", "train", "evaluate", "register"]
    steps = [c[1] for c in recorder.calls if c[0] == "after_train_step"]
    assert steps == list(range(1, result.train.steps + 1)) == list(range(1, 11))
    assert recorder.calls[-1][0] == "after_stage"
    assert ("after_model_registered", "1", True) in recorder.calls

    client = MlflowClient()
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "tiny"
    tags = run.data.tags
    assert tags["clipforge.recipe_hash"] == clipforge.load_recipe(tiny_recipe).digest()
    assert tags["prefect.flow_run_id"] and tags["clipforge.manifest_hash"] == result.curate.content_hash
    metrics = run.data.metrics
    assert metrics["train/data/decode/kept"] == 160.0
    assert 0.0 <= metrics["eval/retrieval/mean_recall_at_1"] <= 1.0
    assert "eval/zero-shot-classification/acc1" in metrics
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == list(range(1, 11))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"recipe.yaml", "MODEL_CARD.md", "open_clip_model", "figures", "curate"} <= artifacts
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert figures == {"figures/curation_funnel.png", "figures/loss_curve.png"}
    evaluation = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/champion_report.md", "evaluation/champion_report.json", "evaluation/retrieval"} <= evaluation
    assert {a.path for a in client.list_artifacts(run.info.run_id, "evaluation/retrieval")} == {
        "evaluation/retrieval/recall_at_k.png",
        "evaluation/retrieval/similarity.png",
    }
    assert client.list_artifacts(run.info.run_id, "evaluation/zero-shot-classification")[0].path.endswith("confusion.png")

    version = client.get_model_version_by_alias("tiny-clip", "champion")
    assert str(version.version) == "1" and version.run_id == run.info.run_id
    assert client.get_model_version_by_alias("tiny-clip", "challenger").version == version.version
    assert version.tags["clipforge.manifest_uri"].endswith("manifest.parquet")
    assert version.tags["clipforge.recipe_hash"] == tags["clipforge.recipe_hash"]

    model = mlflow.pyfunc.load_model("models:/tiny-clip@champion")
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buf, format="PNG")
    import base64

    emb = model.predict(
        pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode(), None], "text": [None, "a red circle"]})
    )
    assert emb.shape == (2, 32)

    # the same recipe again: version 2, champion only if better (identical training: it is not)
    again = retrain_flow(tiny_recipe, tracking_uri=tracking)
    assert again.curate.reused is True
    assert again.register.version == "2" and again.register.promoted is False
    assert client.get_model_version_by_alias("tiny-clip", "challenger").version in (2, "2")
    assert str(client.get_model_version_by_alias("tiny-clip", "champion").version) == "1"
    report = mlflow.artifacts.load_dict(f"runs:/{again.mlflow_run_id}/evaluation/champion_report.json")
    assert report["champion"] == {"version": "1"} and report["decision"]["promoted"] is False
    assert "does not beat champion v1" in report["decision"]["reason"]
    (rule,) = [r for r in report["rows"] if r["promotion_metric"]]
    assert rule["metric"] == "eval/retrieval/mean_recall@1" and rule["champion"] == metrics["eval/retrieval/mean_recall_at_1"]

    # the champion evaluated again, on its own, from the registry: the run's metrics
    from clipforge.cli import main
    from tests.conftest import write_yaml

    out = tmp_path / "metrics.json"
    path = write_yaml(tmp_path / "r.yaml", tiny_recipe)
    assert main(["evaluate", "models:/tiny-clip@champion", "--recipe", str(path), "--output", str(out), "--device", "cpu"]) == 0
    again_metrics = json.loads(out.read_text())
    assert again_metrics.keys() == result.evaluate.metrics.keys()
    for name, value in result.evaluate.metrics.items():
        assert again_metrics[name] == pytest.approx(value, abs=1e-6), name
    assert main(["evaluate", "models:/tiny-clip@nope", "--recipe", str(path)]) == 2


def test_a_failed_retrain_leaves_the_registry_alone_and_resumes(tiny_recipe, tracking, prefect_server, recorder):
    from clipforge.flows import retrain_flow

    recorder.fail_evaluation = True
    with pytest.raises(RuntimeError, match="evaluation failed on purpose"):
        retrain_flow(tiny_recipe, tracking_uri=tracking)
    assert [c[1] for c in recorder.calls if c[0] == "on_stage_error"] == ["evaluate"]
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.status == "FAILED" and "evaluation failed on purpose" in run.data.tags["clipforge.error"]
    assert client.search_registered_models() == []

    recorder.fail_evaluation = False
    recorder.calls.clear()
    run_id = run.data.tags["clipforge.run_id"]
    result = retrain_flow(tiny_recipe, run_id=run_id, tracking_uri=tracking)
    assert recorder.stages("before_stage") == ["evaluate", "register"]  # curation and training are not redone
    assert result.mlflow_run_id == run.info.run_id
    resumed = client.get_run(run.info.run_id)
    assert resumed.info.status == "FINISHED" and "clipforge.error" not in resumed.data.tags
    assert "evaluation failed on purpose" in resumed.data.tags["clipforge.resumed_after"]
    assert "resumed" in mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/error.txt")
    assert str(client.get_model_version_by_alias("tiny-clip", "champion").version) == "1"
