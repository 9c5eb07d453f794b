"""Phase 3: each part's survivors, less the whole-dataset drops, resized and written as the curated
shards (one task per part); then one manifest of every input key and a summary."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from clipforge.core.components import DecidesAgainstPool, Sample
from clipforge.core.errors import StageError
from clipforge.core.recipe import Recipe
from clipforge.core.results import CurateResult, Shard
from clipforge.core.storage import Store
from clipforge.engine.curation.layout import (
    DECODE_STEP,
    FEATURES_INDEX,
    FORMAT_VERSION,
    MANIFEST,
    MANIFEST_SCHEMA,
    PART_FINAL,
    PART_MANIFEST,
    STAGED,
    SUMMARY,
    curated_shard,
    part_dir,
    part_score_names,
    whole_scores,
)
from clipforge.engine.curation.parts import Funnel, PartResult
from clipforge.engine.curation.plan import Job, Steps, input_size, step_labels
from clipforge.engine.curation.reduce import Drop, Reduced
from clipforge.engine.shards import Decoded, decode, encode, iter_shard, write_shards

if TYPE_CHECKING:
    from clipforge.engine.curation.pool import PoolChain


class FinalizeJob(Job):
    """Write part ``index``'s curated shards: its survivors start at position ``first``; ``drops`` are its own."""

    first: int
    drops: list[Drop]


def finalize_part(job: FinalizeJob) -> list[Shard]:
    """A part's final shards: its staged survivors less the whole-dataset drops, resized to the model's input."""
    recipe, catalog, store = job.open()
    folder = part_dir(job.out, job.index)
    if store.exists(f"{folder}/{PART_FINAL}"):
        return [Shard.model_validate(s) for s in store.read_json(f"{folder}/{PART_FINAL}")]
    size = input_size(recipe, catalog)
    dropped = {d.position for d in job.drops}

    def survivors() -> Iterator[Decoded]:
        for position, raw in enumerate(iter_shard(store, f"{folder}/{STAGED}"), start=job.first):
            if position not in dropped:
                item = decode(Sample(raw["key"], raw["image"], raw["caption"], raw["label"], raw["meta"]))
                yield _resized(item, size) if size else item

    shards = write_shards(store, survivors(), lambda n: curated_shard(job.out, job.index, n), recipe.parallel.shard_size)
    store.write_json(f"{folder}/{PART_FINAL}", [s.model_dump() for s in shards])
    return shards


def _resized(item: Decoded, size: int) -> Decoded:
    """Shorter side down to ``size`` (never up), re-encoded in the image's own format."""
    from PIL import Image

    image = item.sample.image
    short = min(image.size)
    if short <= size:
        return item
    scale = size / short
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.BICUBIC)
    item.sample.image = image
    return Decoded(item.sample, encode(image, item.ext), item.ext)


def assemble(recipe: Recipe, store: Store, out: str, steps: Steps, parts: list[PartResult], reduced: Reduced,
             shards: list[list[Shard]], firsts: list[int], seconds: float, pool: PoolChain | None = None) -> CurateResult:  # fmt: skip
    """One manifest (row group by row group, a part at a time), the features index a later curation's
    pool reads, and the summary, from the three phases."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    funnel = Funnel([DECODE_STEP, *step_labels(recipe)])
    for done in parts:
        funnel.add(done.funnel)
    funnel.add(reduced.funnel)
    duplicate_keys = sum(1 for d in reduced.drops if d.step == DECODE_STEP)
    if duplicate_keys:
        # a key already read in an earlier part: dropped at decode, so the per-sample steps, which
        # saw it in its own part, count it as never seen (each step sees what the one before kept)
        funnel.drop(DECODE_STEP, "duplicate key", duplicate_keys)
        for label in step_labels(recipe):
            if label not in reduced.funnel:  # a per-sample step
                funnel.seen[label] -= duplicate_keys
    whole = whole_scores(store, out)
    names = sorted({n for i in range(len(parts)) for n in part_score_names(store, out, i)} | set(whole))
    fields = [pa.field(name, getattr(pa, kind)()) for name, kind in MANIFEST_SCHEMA] + [pa.field(n, pa.float64()) for n in names]
    metadata = {"clipforge.format": str(FORMAT_VERSION), **({"clipforge.pool": pool.manifest} if pool else {})}
    schema = pa.schema(fields, metadata=metadata)
    digest = hashlib.sha256()
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, schema) as writer:
        for i, part_shards in enumerate(shards):
            table = _final_rows(store, out, i, firsts[i], reduced.of_part(firsts[i], parts[i].kept), part_shards, whole)
            for r in range(len(table["key"])):
                digest.update(f"{table['key'][r]}\t{table['kept'][r]}\t{table['step'][r]}\t{table['reason'][r]}\n".encode())
            n = len(table["key"])
            writer.write_table(pa.table({f.name: table.get(f.name, [None] * n) for f in fields}, schema=schema))
    store.write_bytes(f"{out}/{MANIFEST}", buf.getvalue())
    flat = [s for part in shards for s in part]
    for shard in flat:
        digest.update(shard.sha256.encode())
    n_input = sum(p.input for p in parts)
    if n_input == 0:
        raise StageError(f"curate: the training dataset {recipe.data.dataset.type!r} yielded no samples")
    store.write_json(f"{out}/{FEATURES_INDEX}", {
        "parts": len(parts),
        "steps": [{"label": label, "type": steps.types[label],
                   "signature": step.features_signature() if isinstance(step, DecidesAgainstPool) else None}
                  for label, step in steps.whole],
    })  # fmt: skip
    summary = CurateResult(
        out=out, input=n_input, kept=sum(s.samples for s in flat), parts=len(parts), funnel=funnel.counts(), shards=flat,
        manifest=f"{out}/{MANIFEST}", manifest_uri=store.uri(f"{out}/{MANIFEST}"),
        content_hash=digest.hexdigest(), seconds=round(seconds, 3),
        pairs_per_s=round(n_input / seconds, 1) if seconds > 0 else None, pool=pool.manifest if pool else None,
    )  # fmt: skip
    store.write_json(f"{out}/{SUMMARY}", summary.model_dump(mode="json"))  # last: marks a complete curation
    return summary


def _final_rows(store: Store, out: str, index: int, first: int, drops: list[Drop], shards: list[Shard],
                whole: dict[str, list[float | None]]) -> dict[str, list[Any]]:  # fmt: skip
    """Part ``index``'s manifest rows with the whole-dataset verdicts and scores applied and each kept pair's shard."""
    import pyarrow.parquet as pq

    table = pq.read_table(store.open(f"{part_dir(out, index)}/{PART_MANIFEST}")).to_pydict()
    n = len(table["key"])
    by_position = {d.position: d for d in drops}
    names = iter([s.path for s in shards for _ in range(s.samples)])
    for name in whole:
        table[name] = [None] * n
    table["shard"] = []
    position = first
    for r in range(n):
        if table["kept"][r]:
            for name, values in whole.items():
                table[name][r] = values[position]
            drop = by_position.get(position)
            position += 1
            if drop:
                table["kept"][r] = False
                table["step"][r], table["reason"][r] = drop.step, drop.reason
                table["detail"][r] = drop.detail or table["detail"][r]  # else where the sample was read
        table["shard"].append(next(names) if table["kept"][r] else None)
    return table
