"""Curation: the recipe's steps over a dataset, in parts that run in parallel, with a verdict for every sample.

Three phases, each resumable from what it left on the store:

1. **parts** (parallel, :mod:`.parts`): each part of the dataset is decoded and passed through the
   per-sample steps; what survives is staged as a tar shard, with the features the whole-dataset
   steps need.
2. **reduce** (once, :mod:`.reduce`): the whole-dataset steps (deduplication, balancing, top
   fractions) decide over every surviving sample, from the features alone.
3. **finalize** (parallel, :mod:`.finalize`): each part's survivors are resized to the model's
   input size and written as the curated shards; one Parquet manifest holds every input key
   and its verdict.

:func:`curate` is the one sequence; the mapping function runs the parallel phases (the builtin
``map`` in this process, or the curate flow's Prefect tasks on a task runner).
"""

from __future__ import annotations

import time

from clipforge.core.catalog import Catalog
from clipforge.core.recipe import Recipe
from clipforge.core.results import CurateResult
from clipforge.core.storage import Store
from clipforge.engine.curation.finalize import FinalizeJob, assemble, finalize_part
from clipforge.engine.curation.layout import DECODE_STEP, SUMMARY
from clipforge.engine.curation.partitioned import TASKS as REDUCE_TASKS
from clipforge.engine.curation.partitioned import Mapper, decide_in_partitions
from clipforge.engine.curation.parts import PartJob, PartResult, curate_part
from clipforge.engine.curation.plan import build_steps, curation_key, input_size, parts_of
from clipforge.engine.curation.pool import PoolChain, open_pool
from clipforge.engine.curation.reduce import first_positions, reduce


def curate(
    recipe: Recipe,
    catalog: Catalog,
    store: Store,
    out: str,
    *,
    mapper: Mapper = map,
    progress: bool = True,
    pool: PoolChain | None = None,
) -> CurateResult:
    """Curate the recipe's training data under ``out`` (reused when ``out/summary.json`` exists).

    ``pool``: the curated data to decide against (:func:`open_pool`); by default the recipe's
    ``curation_pool`` when it names a manifest (``from: champion`` is resolved by the curate flow,
    which asks MLflow and passes the pool here). ``out`` should depend on it: :func:`curation_key`.
    """
    from tqdm.auto import tqdm

    if store.exists(f"{out}/{SUMMARY}"):
        return CurateResult.model_validate(store.read_json(f"{out}/{SUMMARY}"))
    start = time.perf_counter()
    steps = build_steps(recipe, catalog)  # a recipe whose steps cannot be built fails here, before any work
    pool = pool if pool is not None else pool_of(recipe)
    jobs = [PartJob(recipe=recipe, store=store.url, out=out, index=i, entry=e) for i, e in enumerate(parts_of(recipe, catalog))]
    # disable=None: a bar on terminals only
    parts: list[PartResult] = list(tqdm(mapper(curate_part, jobs), total=len(jobs), desc="curate", unit="part",
                                        disable=None if progress else True))  # fmt: skip
    reduced = reduce(steps, store, out, parts, pool, recipe=recipe, mapper=mapper)
    firsts = first_positions(parts)
    finals = [
        FinalizeJob(recipe=recipe, store=store.url, out=out, index=i, first=firsts[i], drops=reduced.of_part(firsts[i], p.kept))
        for i, p in enumerate(parts)
    ]
    shards = list(mapper(finalize_part, finals))
    return assemble(recipe, store, out, steps, parts, reduced, shards, firsts, time.perf_counter() - start, pool)


def pool_of(recipe: Recipe, champion_manifest: str | None = None) -> PoolChain | None:
    """The pool the recipe's ``curation_pool`` names: its manifest, or ``champion_manifest`` (the
    champion's, looked up by the caller) for ``from: champion``; None without one."""
    spec = recipe.curation_pool
    if spec is None:
        return None
    manifest = spec.manifest or champion_manifest
    return open_pool(manifest, recipe.storage.options, statistics=spec.statistics) if manifest else None


__all__ = [
    "DECODE_STEP",
    "REDUCE_TASKS",
    "Mapper",
    "PoolChain",
    "curate",
    "curate_part",
    "curation_key",
    "decide_in_partitions",
    "finalize_part",
    "input_size",
    "open_pool",
    "parts_of",
    "pool_of",
]
