"""The curate flow: raw pairs -> curated shards + a Parquet manifest of every verdict, parts in parallel."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prefect import Task, task
from prefect.task_runners import TaskRunner

from clipforge.core.context import RunContext
from clipforge.core.errors import StageError
from clipforge.core.recipe import ParallelConfig, Recipe
from clipforge.core.results import CurateResult, ReplayResult
from clipforge.core.storage import Store
from clipforge.engine import curation, replay
from clipforge.engine.curation import mixture
from clipforge.flows.figures import funnel_figure
from clipforge.flows.reporting import Progress, publish, say
from clipforge.flows.stage import stage_flow
from clipforge.registry import tracking

# The engine's parallel phases as Prefect tasks: retried, and shown per part in the UI.
_TASKS: dict[Callable[[Any], Any], Task[Any, Any]] = {
    curation.curate_part: task(name="curate-part", retries=2, retry_delay_seconds=[2, 10])(curation.curate_part),
    curation.finalize_part: task(name="finalize-part", retries=2, retry_delay_seconds=[2, 10])(curation.finalize_part),
    # a partitioned reduce's calls: each reads its block or its partition's shares from the store
    **{fn: task(name=f"reduce-{fn.__name__.replace('_', '-')}", retries=2, retry_delay_seconds=[2, 10])(fn)
       for fn in curation.REDUCE_TASKS},
}  # fmt: skip


def task_runner(cfg: ParallelConfig) -> TaskRunner[Any]:
    """The Prefect task runner the recipe asks for."""
    if cfg.runner == "ray":
        from prefect_ray import RayTaskRunner

        address = cfg.address or os.environ.get("RAY_ADDRESS")
        if address:  # a cluster brings its own resources: ray.init refuses them when connecting
            return RayTaskRunner(address=address)
        return RayTaskRunner(init_kwargs={"include_dashboard": False, **({"num_cpus": cfg.workers} if cfg.workers else {})})
    if cfg.runner == "dask":
        from prefect_dask import DaskTaskRunner

        if cfg.address:
            return DaskTaskRunner(address=cfg.address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": cfg.workers or 2, "threads_per_worker": 1, "processes": True})
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

    return (ThreadPoolTaskRunner if cfg.runner == "threads" else ProcessPoolTaskRunner)(max_workers=cfg.workers)


def prefect_mapper(runner: TaskRunner[Any]) -> Callable[[Callable[[Any], Any], list[Any]], Iterable[Any]]:
    """The engine's ``mapper``: each job as a Prefect task on ``runner``, results in order as they complete."""

    def mapper(fn: Callable[[Any], Any], jobs: list[Any]) -> Iterator[Any]:
        futures = [runner.submit(_TASKS[fn], {"job": job}) for job in jobs]
        return (f.result() for f in futures)

    return mapper


class FollowedMapper:
    """A mapper that shows the curation's parallel phases as they go: a bar per phase on a terminal
    (tqdm), a Prefect progress artifact, and a line every tenth of the parts (which the command line
    shows where there is no bar)."""

    def __init__(self, inner: curation.Mapper, run_id: str) -> None:
        self.inner = inner
        self.progress = Progress("curate-progress", f"Curation of run {run_id}", total=1)
        self.offset = 0  # the parts of the phases before this one: the artifact follows both

    def __call__(self, fn: Callable[[Any], Any], jobs: list[Any]) -> Iterator[Any]:
        from tqdm.auto import tqdm

        if fn not in (curation.curate_part, curation.finalize_part):  # the reduce phase's tasks: no bar of their own
            yield from self.inner(fn, jobs)
            return

        phase, n = "parts" if fn is curation.curate_part else "shards", len(jobs)
        total = 2 * n  # each part is curated, then finalized
        pairs = kept = 0
        with tqdm(total=n, desc=f"curate {phase}", unit="part", disable=None) as bar:  # disable=None: terminals only
            for done, result in enumerate(self.inner(fn, jobs), 1):
                if isinstance(result, curation.PartResult):
                    pairs, kept = pairs + result.input, kept + result.kept
                    bar.set_postfix(pairs=f"{pairs:,}", kept=f"{kept:,}")
                bar.update(1)
                line = (
                    f"curate: {done}/{n} parts, {pairs:,} pairs read, {kept:,} kept so far"
                    if phase == "parts"
                    else f"curate: {done}/{n} parts written as shards"
                )
                self.progress.update(self.offset + done, line, total=total)
                yield result
        self.offset += n


@stage_flow("curate")
def curate_flow(ctx: RunContext) -> CurateResult:
    """Curate the recipe's training data; parts already curated with the same data and steps are reused.

    A weighted mixture's sources are curated one after the other, each on its own (an unchanged
    source is reused), then gathered (:func:`~clipforge.engine.curation.mixture.gather_mixture`); a
    source with weight above 0 that keeps nothing stops the run here, before training, as a single
    dataset that keeps nothing does.
    """
    pool = _pool(ctx)
    if ctx.recipe.data.mixture is None:
        summary = _curate(ctx, ctx.recipe, pool, "")
        if summary.kept == 0:
            _stop_empty(f"the training dataset {ctx.recipe.data.dataset.type!r}", summary, "fix the data or its curation")
    else:
        curated = []
        for source, recipe in ctx.recipe.source_recipes():
            result = _curate(ctx, recipe, pool, f" source {source.label!r}")
            if result.kept == 0 and source.weight > 0:
                _stop_empty(f"the source {source.label!r} ({source.source.type})", result, "fix the source or give it weight 0")
            curated.append((source, result))
        summary = mixture.gather_mixture(ctx.store, curated)
        summary = summary.model_copy(update={"reused": all(r.reused for _, r in curated)})
    summary = summary.model_copy(update={"replay": _replay(ctx, summary.kept)})
    _report(ctx, summary)
    say(f"curate: {summary.kept:,} of {summary.input:,} pairs kept in {len(summary.shards)} shard(s); {summary.manifest_uri}")
    return summary


def _curate(ctx: RunContext, recipe: Recipe, pool: curation.PoolChain | None, label: str) -> CurateResult:
    """One dataset's curation (``label`` names a mixture's source in the lines), reused when it exists."""
    store = ctx.store
    out = f"curated/{curation.curation_key(recipe, pool)}"
    reused = store.exists(f"{out}/summary.json")
    if reused:
        say(f"curate{label}: reusing {store.uri(out)} (same data, steps and pool)")
        summary = curation.curate(recipe, ctx.plugins.catalog, store, out, pool=pool)  # what that curation left
    else:
        if pool is not None:
            say(f"curate{label}: against the pool {pool.manifest} ({len(pool.curations)} curation(s))")
        with task_runner(recipe.parallel) as runner:
            mapper = FollowedMapper(prefect_mapper(runner), ctx.run_id)
            summary = curation.curate(recipe, ctx.plugins.catalog, store, out, mapper=mapper, pool=pool, progress=False)
            mapper.progress.finish()
    if label:
        say(f"curate{label}: {summary.kept:,} of {summary.input:,} pairs kept")
    return summary.model_copy(update={"reused": reused})


def _stop_empty(what: str, result: CurateResult, fix: str) -> None:
    """Stop before training on data that kept nothing, with why each pair went."""
    raise StageError(
        f"curate: {what} kept none of its {result.input:,} pairs ({_drops(result)}); the run stops before training: {fix}"
    )


def _drops(result: CurateResult) -> str:
    """The drop reasons of a curation, most frequent first."""
    reasons: dict[str, int] = {}
    for counts in result.funnel.values():
        for reason, n in counts.reasons.items():
            reasons[reason] = reasons.get(reason, 0) + n
    return ", ".join(f"{r}: {n:,}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])) or "no input"


def _replay(ctx: RunContext, new: int) -> ReplayResult | None:
    """The recipe's ``data.replay``: a sample of what the champion (or a manifest's model) trained on."""
    spec = ctx.recipe.data.replay
    if spec is None:
        return None
    if spec.manifest:
        sources, source = replay.sources_of(spec.manifest, None, ctx.recipe.storage.options), spec.manifest
    else:
        name = spec.model_name or ctx.recipe.model_name
        version, tags = tracking.champion_lineage(name) or ("", {})
        manifest = tags.get("clipforge.manifest_uri")
        if not manifest:
            say(f"curate: {name} has no champion with curated data yet: nothing to replay")
            return None
        sources = replay.sources_of(manifest, tags.get("clipforge.replay_uri") or None, ctx.recipe.storage.options)
        source = f"{name} v{version}"
    result = replay.replay(ctx.recipe, ctx.store, new, sources, source)
    if result is not None:
        say(
            f"curate: replaying {result.pairs:,} of {result.pool:,} pairs of {source} ({result.fraction:.1%} of the training data)"
        )
    return result


def _pool(ctx: RunContext) -> curation.PoolChain | None:
    """The recipe's ``curation_pool``: a manifest, or the champion's curated data found through its lineage tags."""
    spec = ctx.recipe.curation_pool
    champion = None
    if spec is not None and spec.from_ == "champion":
        name = spec.model_name or ctx.recipe.model_name
        champion = tracking.champion_manifest(name)
        if champion is None:
            say(f"curate: {name} has no champion with curated data yet: curating without a pool")
    return curation.pool_of(ctx.recipe, champion)


#: The namespace of the curation's counts among the run's metrics.
DATA = "train/data"


def _report(ctx: RunContext, summary: CurateResult) -> None:
    """The funnel's counts and figure to MLflow, the data's identity as tags, a table to Prefect."""
    run = tracking.mlflow_run(ctx)
    funnel = summary.funnel
    # under train/data/: the MLflow UI orders chart sections by name, and the counts' sections would
    # otherwise come before the training curves (curate/ < train/)
    metrics = {f"{DATA}/{step}/{k}": float(getattr(v, k)) for step, v in funnel.items() for k in ("kept", "dropped")}
    metrics.update({f"{DATA}/input": float(summary.input), f"{DATA}/kept": float(summary.kept)})
    if summary.pairs_per_s:
        metrics[f"{DATA}/curated_pairs_per_s"] = float(summary.pairs_per_s)
    if summary.replay:
        metrics.update({f"{DATA}/replay/pairs": float(summary.replay.pairs), f"{DATA}/replay/fraction": summary.replay.fraction})
    for source in summary.sources:
        metrics.update(
            {f"{DATA}/sources/{source.name}/input": float(source.input), f"{DATA}/sources/{source.name}/kept": float(source.kept)}
        )
    tracking.log_metrics(run, metrics)
    tracking.log_curated_data(run, summary, manifest_columns(ctx.store, summary.manifest))
    tags = {"clipforge.manifest_uri": summary.manifest_uri, "clipforge.manifest_hash": summary.content_hash}
    if summary.pool:
        tags["clipforge.pool_manifest_uri"] = summary.pool
    if summary.replay:
        tags |= {"clipforge.replay_uri": summary.replay.uri, "clipforge.replay_source": summary.replay.source}
    tracking.set_tags(run, tags)
    tracking.log_dict(run, summary.model_dump(mode="json"), "curate/summary.json")
    tracking.log_figure(run, funnel_figure(funnel), "figures/curation_funnel.png")
    publish(
        "table",
        "curation-funnel",
        f"Curation of run {ctx.run_id}: {summary.kept:,} of {summary.input:,} pairs kept",
        table=[
            {"step": s, **v.model_dump(exclude={"reasons"}), "reasons": ", ".join(f"{r}: {n}" for r, n in v.reasons.items())}
            for s, v in funnel.items()
        ],
    )


#: The MLflow type of each Arrow type a manifest column has (anything else is shown as a string).
_MLFLOW_TYPES = {"string": "string", "large_string": "string", "int64": "long", "int32": "integer", "double": "double",
                 "float": "float", "bool": "boolean"}  # fmt: skip


def manifest_columns(store: Store, manifest: str) -> dict[str, str]:
    """The manifest's columns and their MLflow types, read from its Parquet footer."""
    import pyarrow.parquet as pq

    with store.open(manifest) as f:
        schema = pq.read_schema(f)
    return {field.name: _MLFLOW_TYPES.get(str(field.type), "string") for field in schema}
