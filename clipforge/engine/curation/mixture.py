"""A weighted mixture's curated data: each source curated on its own (its own key, so an unchanged
source is reused), gathered in one folder that lineage and replay read like any curation's.

``curated/mix-<key>/`` holds ``summary.json`` (the sources' results, every shard where its source's
curation wrote it) and ``manifest.parquet``: every source's manifest, one after the other, with a
``source`` column.
"""

from __future__ import annotations

from clipforge.core.hashing import content_hash
from clipforge.core.recipe import MixtureSource
from clipforge.core.results import CurateResult, SourceShards, StepCounts
from clipforge.core.storage import Store
from clipforge.engine.curation.layout import MANIFEST, SUMMARY, write_table


def mixture_hash(curated: list[tuple[MixtureSource, CurateResult]]) -> str:
    """What a mixture's data is: each source's name, weight and curated content, in order."""
    return content_hash([(s.label, s.weight, c.content_hash) for s, c in curated], sort_keys=False)


def gather_mixture(store: Store, curated: list[tuple[MixtureSource, CurateResult]]) -> CurateResult:
    """The mixture of the sources' curations, written under ``curated/mix-<key>`` (reused when there)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    digest = mixture_hash(curated)
    out = f"curated/mix-{digest[:16]}"
    if store.exists(f"{out}/{SUMMARY}"):
        return CurateResult.model_validate(store.read_json(f"{out}/{SUMMARY}"))
    tables = []
    for source, result in curated:
        with store.open(result.manifest) as f:
            table = pq.read_table(f)
        tables.append(table.append_column("source", pa.array([source.label] * table.num_rows, pa.string())))
    write_table(store, f"{out}/{MANIFEST}", pa.concat_tables(tables, promote_options="default"))
    funnel: dict[str, StepCounts] = {}
    for _, result in curated:
        for step, counts in result.funnel.items():
            total = funnel.setdefault(step, StepCounts())
            total.seen, total.kept, total.dropped = (
                total.seen + counts.seen,
                total.kept + counts.kept,
                total.dropped + counts.dropped,
            )
            for reason, n in counts.reasons.items():
                total.reasons[reason] = total.reasons.get(reason, 0) + n
    seconds = sum(r.seconds for _, r in curated)
    summary = CurateResult(
        out=out, input=sum(r.input for _, r in curated), kept=sum(r.kept for _, r in curated),
        parts=sum(r.parts for _, r in curated), funnel=funnel, shards=[s for _, r in curated for s in r.shards],
        manifest=f"{out}/{MANIFEST}", manifest_uri=store.uri(f"{out}/{MANIFEST}"), content_hash=digest, seconds=round(seconds, 3),
        pool=curated[0][1].pool, reused=all(r.reused for _, r in curated),
        sources=[
            SourceShards(name=s.label, weight=s.weight, shards=r.shards, input=r.input, kept=r.kept,
                         manifest_uri=r.manifest_uri, content_hash=r.content_hash, reused=r.reused)
            for s, r in curated
        ],
    )  # fmt: skip
    store.write_json(f"{out}/{SUMMARY}", summary.model_dump(mode="json"))  # last: marks it complete
    return summary
