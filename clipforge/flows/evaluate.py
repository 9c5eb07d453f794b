"""The evaluate flow: the trained model -> metrics JSON on the store and in MLflow."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from clipforge.engine.evaluation import evaluate_model
from clipforge.flows.common import open_context, require, stage
from clipforge.flows.figures import evaluation_figures
from clipforge.flows.tracking import log_figure, mlflow_run
from clipforge.registry import log_metrics


@flow(name="evaluate", log_prints=True)
def evaluate_flow(recipe: dict[str, Any], run_id: str) -> dict[str, Any]:
    """Run every evaluator of the recipe on the run's trained model."""
    ctx = open_context(recipe, run_id)
    trained = require(ctx, "evaluate", "train")
    with stage(ctx, "evaluate") as result:
        evaluation = evaluate_model(ctx.recipe, ctx.plugins.catalog, ctx.store, trained["model"], device=ctx.recipe.train.device)
        metrics = evaluation.metrics
        uri = ctx.store.write_json(f"{ctx.run_dir}/evaluate/metrics.json", metrics)
        log_metrics(metrics, run_id=mlflow_run(ctx))
        for path, fig in evaluation_figures(evaluation.details).items():
            log_figure(ctx, fig, path)
        ctx.plugins.hook.after_evaluation(context=ctx, metrics=metrics)
        rows = "\n".join(f"| `{k}` | {v:.4f} |" for k, v in sorted(metrics.items()))
        create_markdown_artifact(
            key="evaluation", markdown=f"# Evaluation of run {ctx.run_id}\n\n| metric | value |\n|---|---|\n{rows}\n"
        )
        result.update(metrics=metrics, metrics_uri=uri)
    return ctx.state["evaluate"]
