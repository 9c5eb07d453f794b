"""The evaluate flow: the trained model -> metrics JSON on the store and in MLflow."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from clipforge.core.context import RunContext
from clipforge.core.errors import ConfigError
from clipforge.core.plugins import get_plugin_manager
from clipforge.core.recipe import Recipe
from clipforge.core.results import EvaluateResult, TrainResult
from clipforge.engine.evaluation import Evaluation, evaluate
from clipforge.flows import tracking
from clipforge.flows.common import open_context, require, run_stage
from clipforge.flows.figures import evaluation_figures

#: On runs and registered versions: the evaluation data their metrics were measured on (:attr:`EvaluateResult.data_hash`).
EVAL_HASH_TAG = "clipforge.eval_hash"


@flow(name="evaluate", log_prints=True)
def evaluate_flow(recipe: dict[str, Any], run_id: str) -> EvaluateResult:
    """Run every evaluator of the recipe on the run's trained model."""
    ctx = open_context(recipe, run_id)
    trained = require(ctx, "evaluate", "train")
    return run_stage(ctx, "evaluate", lambda: _evaluate(ctx, trained))


def _evaluate(ctx: RunContext, trained: TrainResult) -> EvaluateResult:
    evaluation = evaluate(ctx.recipe, ctx.plugins.catalog, ctx.store.uri(trained.model), device=ctx.recipe.train.device)
    metrics = evaluation.metrics
    uri = ctx.store.write_json(f"{ctx.run_dir}/evaluate/metrics.json", metrics)
    run = tracking.mlflow_run(ctx)
    tracking.log_metrics(run, metrics)
    tracking.set_tags(run, {EVAL_HASH_TAG: evaluation.data_hash})
    for path, fig in evaluation_figures(evaluation.details).items():
        tracking.log_figure(run, fig, path)
    ctx.plugins.hook.after_evaluation(context=ctx, metrics=metrics)
    rows = "\n".join(f"| `{k}` | {v:.4f} |" for k, v in sorted(metrics.items()))
    create_markdown_artifact(
        key="evaluation", markdown=f"# Evaluation of run {ctx.run_id}\n\n| metric | value |\n|---|---|\n{rows}\n"
    )
    return EvaluateResult(metrics=metrics, metrics_uri=uri, data_hash=evaluation.data_hash)


def evaluate_uri(recipe: Recipe, model_uri: str, *, device: str | None = None) -> Evaluation:
    """Run the recipe's evaluators on any model reference (a registered model, a logged one, a folder,
    a checkpoint; see :func:`~clipforge.core.resolver.resolve_model`); nothing is trained or logged."""
    if not recipe.evaluation:
        raise ConfigError("the recipe has no evaluation: section; nothing to evaluate")
    return evaluate(recipe, get_plugin_manager().catalog, model_uri, device=device or recipe.train.device)
