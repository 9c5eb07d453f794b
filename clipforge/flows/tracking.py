"""The one MLflow run of a retrain: opened by the first stage that needs it, closed by the retrain flow."""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

import clipforge
from clipforge.core.context import RunContext
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


def mlflow_run(ctx: RunContext, artifact_root: str | None = None) -> str:
    """The retrain's MLflow run id, creating the run (tags, params, recipe) the first time."""
    if ctx.mlflow_run_id:
        return ctx.mlflow_run_id
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
    run = client.create_run(experiment_id, run_name=ctx.run_id, tags=tags)
    params = flat_params(ctx.recipe.as_dict())
    items = [mlflow.entities.Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    client.log_text(run.info.run_id, ctx.recipe.to_yaml(), "recipe.yaml")
    ctx.mlflow_run_id = run.info.run_id
    ctx.save_state()
    return ctx.mlflow_run_id


def log_figure(ctx: RunContext, fig, path: str) -> None:
    from clipforge.flows.figures import close

    MlflowClient().log_figure(mlflow_run(ctx), fig, path)
    close(fig)
