"""The one MLflow run of a retrain: opened by the first stage that needs it, closed by the retrain flow."""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.tracking import MlflowClient
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

import clipforge
from clipforge.core.context import RunContext
from clipforge.core.storage import is_transient
from clipforge.registry import ensure_experiment

# Recipe fields that may carry secrets never become MLflow params.
_PRIVATE = ("storage.options",)


def flat_params(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if any(path == p or path.startswith(p + ".") for p in _PRIVATE):
            continue
        if isinstance(value, dict):
            out.update(flat_params(value, path + "."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, v in enumerate(value):
                out.update(flat_params(v, f"{path}.{i}."))
        else:
            out[path] = str(value)[:6000]
    return out


def _retry_transient(task, task_run, state) -> bool:
    """Retry a tracking call only when the tracking server or database was briefly unavailable."""
    try:
        state.result()
    except Exception as e:
        return is_transient(e) or "database is locked" in str(e)
    return False


# Tracking I/O as Prefect tasks: a tracking server that restarts or a SQLite store another retrain
# holds locked is retried with backoff (on top of MLflow's own HTTP retries) instead of failing the run.
tracking_io = task(
    retries=4,
    retry_delay_seconds=exponential_backoff(backoff_factor=1),
    retry_jitter_factor=0.5,
    retry_condition_fn=_retry_transient,
    cache_policy=NO_CACHE,
)


def mlflow_run(ctx: RunContext, artifact_root: str | None = None) -> str:
    """The retrain's MLflow run id, creating the run (tags, params, recipe) the first time."""
    if ctx.mlflow_run_id:
        return ctx.mlflow_run_id
    ctx.mlflow_run_id = create_mlflow_run(ctx, artifact_root)
    ctx.save_state()
    return ctx.mlflow_run_id


@tracking_io
def create_mlflow_run(ctx: RunContext, artifact_root: str | None = None) -> str:
    from prefect.runtime import flow_run

    experiment_id = ensure_experiment(ctx.recipe.name, artifact_root)
    tags = {
        "clipforge.run_id": ctx.run_id,
        "clipforge.version": clipforge.__version__,
        "clipforge.recipe_hash": ctx.recipe.digest(),
        "clipforge.storage": ctx.store.url,
        "mlflow.runName": ctx.run_id,
    }
    if flow_run.id:
        tags["prefect.flow_run_id"] = str(flow_run.id)
    client = MlflowClient()
    # a retry after a partial success (or a crash before run.json was saved) finds the run it created
    earlier = client.search_runs([experiment_id], f"tags.`clipforge.run_id` = '{ctx.run_id}'", max_results=1)
    run = earlier[0] if earlier else client.create_run(experiment_id, run_name=ctx.run_id, tags=tags)
    params = flat_params(ctx.recipe.as_dict())
    items = [mlflow.entities.Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    client.log_text(run.info.run_id, ctx.recipe.to_yaml(), "recipe.yaml")
    return run.info.run_id


def log_figure(ctx: RunContext, fig, path: str) -> None:
    from clipforge.flows.figures import close

    try:
        log_figure_to_run(mlflow_run(ctx), fig, path)
    finally:
        close(fig)


@tracking_io
def log_figure_to_run(run_id: str, fig, path: str) -> None:
    MlflowClient().log_figure(run_id, fig, path)


@tracking_io
def finish_mlflow_run(run_id: str, error: BaseException | None = None, error_text: str = "") -> None:
    """Mark the run FINISHED, or FAILED with the error as a tag and its traceback as ``error.txt``."""
    client = MlflowClient()
    if error is None:
        client.set_terminated(run_id, status="FINISHED")
        return
    client.set_tag(run_id, "clipforge.error", f"{type(error).__name__}: {error}"[:5000])
    client.log_text(run_id, error_text, "error.txt")
    client.set_terminated(run_id, status="FAILED")
