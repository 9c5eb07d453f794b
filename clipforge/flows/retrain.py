"""The retrain flow: curate -> train -> evaluate -> register, one MLflow run, resumable by run id."""

from __future__ import annotations

import traceback
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient
from prefect import flow
from prefect.artifacts import create_link_artifact

from clipforge.flows.common import STAGES, open_context
from clipforge.flows.curate import curate_flow
from clipforge.flows.evaluate import evaluate_flow
from clipforge.flows.register import register_flow
from clipforge.flows.tracking import mlflow_run
from clipforge.flows.train import train_flow

STAGE_FLOWS = {"curate": curate_flow, "train": train_flow, "evaluate": evaluate_flow, "register": register_flow}


@flow(name="retrain", log_prints=True)
def retrain_flow(
    recipe: dict[str, Any],
    run_id: str | None = None,
    stages: list[str] = list(STAGES),
    tracking_uri: str | None = None,
    artifact_root: str | None = None,
) -> dict[str, Any]:
    """Run the recipe's stages in order as subflows; with the ``run_id`` of a failed run, completed stages are skipped."""
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    ctx = open_context(recipe, run_id)
    ctx.save_state()
    run = mlflow_run(ctx, artifact_root)
    client = MlflowClient()
    if client.get_run(run).info.status != "RUNNING":
        client.update_run(run, status="RUNNING")
    recipe_data = ctx.recipe.as_dict()
    try:
        for name in STAGES:
            if name not in stages:
                continue
            if name in ctx.state:
                print(f"{name}: already done in run {ctx.run_id}, skipped")
                continue
            STAGE_FLOWS[name](recipe_data, ctx.run_id)
            ctx = open_context(ctx.recipe, ctx.run_id)
    except BaseException as e:
        client.set_tag(run, "clipforge.error", f"{type(e).__name__}: {e}"[:5000])
        client.log_text(run, traceback.format_exc(), "error.txt")
        client.set_terminated(run, status="FAILED")
        raise
    client.set_terminated(run, status="FINISHED")
    if mlflow.get_tracking_uri().startswith("http"):
        experiment = client.get_run(run).info.experiment_id
        url = f"{mlflow.get_tracking_uri()}/#/experiments/{experiment}/runs/{run}"
        create_link_artifact(key="mlflow-run", link=url, description="The MLflow run of this retrain")
    return {"run_id": ctx.run_id, "mlflow_run_id": run, "store": ctx.store.uri(ctx.run_dir), **ctx.state}
