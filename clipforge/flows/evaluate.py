"""The evaluate flow: the trained model -> metrics JSON on the store and in MLflow."""

from __future__ import annotations

import tempfile
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from clipforge.core.checkpoint import load_open_clip_dir
from clipforge.core.errors import ConfigError
from clipforge.core.plugins import get_plugin_manager
from clipforge.core.recipe import Recipe
from clipforge.engine.evaluation import Evaluation, evaluate_bundle, evaluate_model
from clipforge.engine.trainer import resolve_device
from clipforge.flows.common import open_context, require, stage
from clipforge.flows.figures import evaluation_figures
from clipforge.flows.tracking import log_figure, mlflow_run
from clipforge.registry import log_metrics
from clipforge.registry.models import fetch_open_clip_dir


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


def evaluate_uri(recipe: Recipe, model_uri: str, *, device: str | None = None) -> Evaluation:
    """Run the recipe's evaluators on a registered model, a logged one or a checkpoint folder; nothing is trained or logged.

    ``model_uri``: ``models:/NAME@champion``, ``models:/NAME/3``, an open_clip folder path or a
    store URI (see :func:`clipforge.registry.models.fetch_open_clip_dir`).
    """
    if not recipe.evaluation:
        raise ConfigError("the recipe has no evaluation: section; nothing to evaluate")
    plugins = get_plugin_manager()
    dev = str(resolve_device(device or recipe.train.device))
    with tempfile.TemporaryDirectory() as tmp:
        bundle = load_open_clip_dir(fetch_open_clip_dir(model_uri, tmp, recipe.storage.options), device=dev)
    return evaluate_bundle(recipe, plugins.catalog, bundle, dev)
