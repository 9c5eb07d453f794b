"""The curate flow: raw pairs -> curated shards + a Parquet manifest of every verdict."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact

from clipforge.engine.curation import curate, curation_key
from clipforge.flows.common import open_context, stage
from clipforge.flows.figures import funnel_figure
from clipforge.flows.tracking import log_figure, mlflow_run
from clipforge.registry import log_metrics


@flow(name="curate", log_prints=True)
def curate_flow(recipe: dict[str, Any], run_id: str) -> dict[str, Any]:
    """Curate the recipe's training data; an identical earlier curation (same data, same steps) is reused."""
    ctx = open_context(recipe, run_id)
    with stage(ctx, "curate") as result:
        out = f"curated/{curation_key(ctx.recipe)}"
        if ctx.store.exists(f"{out}/summary.json"):
            summary = {**ctx.store.read_json(f"{out}/summary.json"), "reused": True}
            print(f"curate: reusing {ctx.store.uri(out)} (same data and steps)")
        else:
            summary = {**curate(ctx.recipe, ctx.plugins.catalog, ctx.store, out), "reused": False}
        funnel = summary["funnel"]
        run = mlflow_run(ctx)
        metrics = {f"curate/{step}/{k}": float(v[k]) for step, v in funnel.items() for k in ("kept", "dropped")}
        metrics.update({"curate/input": float(summary["input"]), "curate/kept": float(summary["kept"])})
        if summary.get("pairs_per_s"):
            metrics["curate/pairs_per_s"] = float(summary["pairs_per_s"])
        log_metrics(metrics, run_id=run)
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        client.set_tag(run, "clipforge.manifest_uri", summary["manifest_uri"])
        client.set_tag(run, "clipforge.manifest_hash", summary["content_hash"])
        client.log_dict(run, summary, "curate/summary.json")
        log_figure(ctx, funnel_figure(funnel), "figures/curation_funnel.png")
        create_table_artifact(
            key="curation-funnel",
            table=[
                {"step": s, "seen": v["seen"], "kept": v["kept"], "dropped": v["dropped"],
                 "reasons": ", ".join(f"{r}: {n}" for r, n in v["reasons"].items())}
                for s, v in funnel.items()
            ],  # fmt: skip
            description=f"Curation of run {ctx.run_id}: {summary['kept']:,} of {summary['input']:,} pairs kept",
        )
        result.update(
            out=out, shards=summary["shards"], kept=summary["kept"], input=summary["input"],
            manifest_uri=summary["manifest_uri"], content_hash=summary["content_hash"], reused=summary["reused"],
            funnel=funnel,
        )  # fmt: skip
    return ctx.state["curate"]
