"""The curate flow: raw pairs -> curated shards + a Parquet manifest of every verdict, parts in parallel."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_table_artifact

from clipforge.core.plugins import get_plugin_manager
from clipforge.core.recipe import ParallelConfig, load_recipe
from clipforge.core.storage import Store
from clipforge.engine import curation
from clipforge.flows.common import open_context, stage
from clipforge.flows.figures import funnel_figure
from clipforge.flows.tracking import log_figure, mlflow_run
from clipforge.registry import log_metrics


def task_runner(cfg: ParallelConfig):
    """The Prefect task runner the recipe asks for."""
    if cfg.runner == "dask":
        from prefect_dask import DaskTaskRunner

        if cfg.address:
            return DaskTaskRunner(address=cfg.address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": cfg.workers or 2, "threads_per_worker": 1, "processes": True})
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

    return (ThreadPoolTaskRunner if cfg.runner == "threads" else ProcessPoolTaskRunner)(max_workers=cfg.workers)


def _open(recipe: dict[str, Any]):
    # Tasks may run in other processes or machines: each rebuilds what it needs from plain data.
    plugins = get_plugin_manager()
    r = load_recipe(recipe, catalog=plugins.catalog)
    return r, plugins.catalog, Store(r.storage.root, r.storage.options)


@task(name="curate-part", retries=2, retry_delay_seconds=[2, 10])
def curate_part_task(recipe: dict[str, Any], out: str, index: int, entry: dict[str, Any]) -> dict[str, Any]:
    r, catalog, store = _open(recipe)
    return curation.curate_part(r, catalog, store, out, index, entry)


@task(name="finalize-part", retries=2, retry_delay_seconds=[2, 10])
def finalize_part_task(recipe: dict[str, Any], out: str, index: int, first: int, drops: dict[str, Any]) -> list[dict[str, Any]]:
    r, _, store = _open(recipe)
    return curation.finalize_part(store, out, index, first, drops, curation.input_size(r), r.parallel.shard_size)


def _map(runner, fn, calls: list[dict[str, Any]]) -> list[Any]:
    futures = [runner.submit(fn, params) for params in calls]
    return [f.result() for f in futures]


@flow(name="curate", log_prints=True)
def curate_flow(recipe: dict[str, Any], run_id: str) -> dict[str, Any]:
    """Curate the recipe's training data; parts already curated with the same data and steps are reused."""
    ctx = open_context(recipe, run_id)
    r, catalog, store = ctx.recipe, ctx.plugins.catalog, ctx.store
    with stage(ctx, "curate") as result:
        out = f"curated/{curation.curation_key(r)}"
        if store.exists(f"{out}/summary.json"):
            summary = {**store.read_json(f"{out}/summary.json"), "reused": True}
            print(f"curate: reusing {store.uri(out)} (same data and steps)")
        else:
            start = time.perf_counter()
            data = r.as_dict()
            entries = curation.parts_of(r, catalog)
            curation.build_steps(r, catalog)  # a misordered recipe fails here, before any work
            print(f"curate: {len(entries)} part(s) on {r.parallel.runner}")
            with task_runner(r.parallel) as runner:
                parts = _map(runner, curate_part_task, [{"recipe": data, "out": out, "index": i, "entry": e} for i, e in enumerate(entries)])
                reduced = curation.reduce(r, catalog, store, out, len(entries))
                firsts = curation.first_positions(parts)
                calls = [
                    {"recipe": data, "out": out, "index": i, "first": firsts[i], "drops": reduced["drops"].get(str(i), {})}
                    for i in range(len(entries))
                ]
                shards = _map(runner, finalize_part_task, calls)
            summary = {**curation.assemble(r, store, out, parts, reduced, shards, time.perf_counter() - start), "reused": False}
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
