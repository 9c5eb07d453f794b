"""The evaluate flow: the trained model -> metrics JSON on the store and in MLflow."""

from __future__ import annotations

from prefect import flow

from clipforge.core.context import RunContext
from clipforge.core.errors import ConfigError
from clipforge.core.evaluations import runs
from clipforge.core.plugins import get_plugin_manager
from clipforge.core.recipe import Recipe
from clipforge.core.results import EvaluateResult, TrainResult
from clipforge.engine.evaluation import Evaluation, evaluate
from clipforge.flows.figures import evaluation_figures
from clipforge.flows.reporting import Progress, publish, say
from clipforge.flows.stage import stage_flow
from clipforge.registry import tracking

#: On runs and registered versions: the evaluation data their metrics were measured on (:attr:`EvaluateResult.data_hash`).
EVAL_HASH_TAG = "clipforge.eval_hash"
#: Next to metrics.json: the per-sample results a promotion with a confidence resamples.
PER_SAMPLE_FILE = "per_sample.json"


@stage_flow("evaluate")
def evaluate_flow(ctx: RunContext, trained: TrainResult) -> EvaluateResult:
    """Run every evaluator of the recipe on the run's trained model."""
    progress = Progress("evaluate-progress", f"Evaluation of run {ctx.run_id}", total=len(list(runs(ctx.recipe))))

    def announce(position: int, count: int, label: str, on: str) -> None:
        progress.update(position - 1, None)
        say(f"evaluate: {position}/{count} {label} on {on}")

    evaluation = evaluate(
        ctx.recipe, ctx.plugins.catalog, ctx.store.uri(trained.model), device=ctx.recipe.train.device, on_evaluator=announce
    )
    progress.finish()
    metrics = evaluation.metrics
    uri = ctx.store.write_json(f"{ctx.run_dir}/evaluate/metrics.json", metrics)
    per_sample_uri = (
        ctx.store.write_json(f"{ctx.run_dir}/evaluate/{PER_SAMPLE_FILE}", per_sample_json(evaluation))
        if evaluation.per_sample
        else ""
    )
    run = tracking.mlflow_run(ctx)
    tracking.log_metrics(run, metrics)
    tracking.log_params(run, {k: repr(v) for k, v in evaluation.params.items()})
    tracking.set_tags(run, {EVAL_HASH_TAG: evaluation.data_hash})
    tracking.log_evaluation_sets(run, ctx.recipe)
    for path, fig in evaluation_figures(evaluation.details).items():
        tracking.log_figure(run, fig, path)
    ctx.plugins.hook.after_evaluation(context=ctx, metrics=metrics)
    publish("markdown", "evaluation", f"Evaluation of run {ctx.run_id}", markdown=evaluation_markdown(ctx.run_id, evaluation))
    say(f"evaluate: {len(metrics)} metrics from {len(ctx.recipe.evaluation)} evaluators; {uri}")
    return EvaluateResult(
        metrics=metrics, metrics_uri=uri, data_hash=evaluation.data_hash, params=evaluation.params, per_sample_uri=per_sample_uri
    )


def per_sample_json(evaluation: Evaluation) -> dict[str, dict]:
    """The evaluation's per-sample results as JSON, by metric name (what ``per_sample.json`` holds)."""
    return {metric: record.as_dict() for metric, record in evaluation.per_sample.items()}


def evaluation_markdown(run_id: str, evaluation: Evaluation) -> str:
    rows = "\n".join(f"| `{k}` | {v:.4f} |" for k, v in sorted(evaluation.metrics.items()))
    chosen = "".join(f"\n| `{k}` (chosen) | {v:g} |" for k, v in sorted(evaluation.params.items()))
    skipped = "".join(
        f"\n\n{where}: {len(keys)} samples skipped, not measured: "
        + ", ".join(f"`{k}` ({why})" for k, why in list(keys.items())[:10])
        for where, keys in evaluation.skipped.items()
    )
    return f"# Evaluation of run {run_id}\n\n| metric | value |\n|---|---|\n{rows}{chosen}{skipped}\n"


def evaluate_uri(recipe: Recipe, model_uri: str, *, device: str | None = None) -> Evaluation:
    """Run the recipe's evaluators on any model reference (a registered model, a logged one, a folder,
    a checkpoint; see :func:`~clipforge.core.resolver.resolve_model`); nothing is trained or logged."""
    if not recipe.evaluation and recipe.data.eval_suite is None:
        raise ConfigError("the recipe has no evaluation: section and no data.eval_suite; nothing to evaluate")
    return evaluate(recipe, get_plugin_manager().catalog, model_uri, device=device or recipe.train.device)


@flow(name="evaluate-model", log_prints=True)
def evaluate_model(recipe_path: str, model: str, overrides: list[str] | None = None) -> dict[str, float]:
    """Evaluate any model reference (``models:/NAME/VERSION``, a folder, ...) on a recipe's evaluators
    and suite; the metrics are published as the flow run's artifact. What a deployment triggered by
    ``clipforge.model.promoted`` runs: the new champion measured on the full benchmark suite."""
    from clipforge.core.validation import load_recipe

    evaluation = evaluate_uri(load_recipe(recipe_path, list(overrides or [])), model)
    publish("markdown", "model-evaluation", f"{model} on {recipe_path}", markdown=evaluation_markdown(model, evaluation))
    say(f"evaluate-model: {model}: {len(evaluation.metrics)} metrics on {recipe_path}")
    return evaluation.metrics
