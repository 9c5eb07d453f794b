"""Curation: run the recipe's steps over a dataset, write the kept pairs as shards and every verdict to a manifest."""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from clipforge.core.catalog import Catalog
from clipforge.core.components import Sample
from clipforge.core.errors import StageError
from clipforge.core.recipe import Recipe
from clipforge.core.storage import Store
from clipforge.engine.shards import BadSample, Decoded, decode, write_shard

FORMAT_VERSION = 1
DECODE_STEP = "decode"
BATCH = 256


def curation_key(recipe: Recipe) -> str:
    """Curated data depends only on the training data and the steps: one folder per such pair."""
    spec = {"v": FORMAT_VERSION, "data": recipe.data.train.entry(), "steps": [s.entry() for s in recipe.curation]}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Funnel:
    """What each step saw, kept and dropped (and why), in order."""

    steps: list[str]
    seen: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    reasons: dict[str, Counter] = field(default_factory=dict)

    def drop(self, step: str, reason: str) -> None:
        self.dropped[step] += 1
        self.reasons.setdefault(step, Counter())[reason] += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            step: {
                "seen": self.seen[step],
                "kept": self.seen[step] - self.dropped[step],
                "dropped": self.dropped[step],
                "reasons": dict(self.reasons.get(step, {})),
            }
            for step in self.steps
        }


def _batches(it: Iterable[Any], n: int) -> Iterator[list[Any]]:
    it = iter(it)
    while batch := list(islice(it, n)):
        yield batch


def curate(
    recipe: Recipe, catalog: Catalog, store: Store, out: str, *, shard_size: int = 1000, progress: bool = True
) -> dict[str, Any]:
    """Curate ``recipe.data.train`` into ``out`` on ``store``; return the summary (also written as ``summary.json``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    dataset = catalog.create("datasets", recipe.data.train.entry())
    labels = [s.type for s in recipe.curation]
    if len(set(labels)) != len(labels):  # two steps of one type: number them so counts stay apart
        labels = [f"{i}-{name}" for i, name in enumerate(labels)]
    steps = [(label, catalog.create("curation_steps", s.entry())) for label, s in zip(labels, recipe.curation)]
    funnel = Funnel([DECODE_STEP, *labels])
    rows: dict[str, list[Any]] = {"key": [], "kept": [], "step": [], "reason": [], "detail": [], "scores": [], "shard": []}
    shards: list[dict[str, Any]] = []
    pending: list[Decoded] = []
    seen_keys: set[str] = set()
    start = time.perf_counter()
    total = len(dataset) if hasattr(dataset, "__len__") else None

    def record(key: str, kept: bool, step: str, reason: str, scores: dict[str, float], shard: str | None, detail: str = "") -> None:
        rows["key"].append(key)
        rows["kept"].append(kept)
        rows["step"].append(step)
        rows["reason"].append(reason)
        rows["detail"].append(detail)
        rows["scores"].append(json.dumps(scores, sort_keys=True) if scores else "")
        rows["shard"].append(shard)

    def flush() -> None:
        rel = f"{out}/shard-{len(shards):06d}.tar"
        shards.append(write_shard(store, rel, pending))
        pending.clear()

    # disable=None: a bar on terminals only, never in the logs of workers and CI
    bar = tqdm(total=total, desc="curate", unit="pair", disable=None if progress else True)
    for batch in _batches(dataset, BATCH):
        bar.update(len(batch))
        alive: list[tuple[Decoded, dict[str, float]]] = []
        for raw in batch:
            funnel.seen[DECODE_STEP] += 1
            key = raw.key if isinstance(raw, Sample) and isinstance(raw.key, str) else repr(getattr(raw, "key", raw))[:200]
            try:
                if not isinstance(raw, Sample):
                    raise BadSample(f"not a Sample ({type(raw).__name__})")
                if key in seen_keys:
                    raise BadSample("duplicate key")
                item = decode(raw)
            except BadSample as e:
                funnel.drop(DECODE_STEP, str(e))
                record(key, False, DECODE_STEP, str(e), {}, None)
                continue
            seen_keys.add(key)
            alive.append((item, {}))
        for label, step in steps:
            if not alive:
                break
            funnel.seen[label] += len(alive)
            verdicts = list(step([item.sample for item, _ in alive]))
            if len(verdicts) != len(alive):
                raise RuntimeError(f"curation step {label!r} returned {len(verdicts)} verdicts for {len(alive)} samples")
            survivors = []
            for (item, scores), verdict in zip(alive, verdicts):
                scores.update({f"{label}/{k}": float(v) for k, v in verdict.scores.items()})
                if verdict.keep:
                    survivors.append((item, scores))
                else:
                    funnel.drop(label, verdict.reason or "dropped")
                    record(item.sample.key, False, label, verdict.reason or "dropped", scores, None, verdict.detail)
            alive = survivors
        for item, scores in alive:
            record(item.sample.key, True, "", "", scores, f"{out}/shard-{len(shards):06d}.tar")
            pending.append(item)
            if len(pending) >= shard_size:
                flush()
    if pending:
        flush()
    bar.close()
    elapsed = time.perf_counter() - start

    buf = io.BytesIO()
    pq.write_table(pa.table(rows), buf)
    store.write_bytes(f"{out}/manifest.parquet", buf.getvalue())
    digest = hashlib.sha256()
    for key, kept, step, reason in zip(rows["key"], rows["kept"], rows["step"], rows["reason"]):
        digest.update(f"{key}\t{kept}\t{step}\t{reason}\n".encode())
    for shard in shards:
        digest.update(shard["sha256"].encode())
    summary = {
        "format": FORMAT_VERSION,
        "input": len(rows["key"]),
        "kept": sum(rows["kept"]),
        "funnel": funnel.as_dict(),
        "shards": shards,
        "manifest": f"{out}/manifest.parquet",
        "manifest_uri": store.uri(f"{out}/manifest.parquet"),
        "content_hash": digest.hexdigest(),
        "seconds": round(elapsed, 3),
        "pairs_per_s": round(len(rows["key"]) / elapsed, 1) if elapsed > 0 else None,
    }
    if summary["input"] == 0:
        raise StageError(f"curate: the training dataset {recipe.data.train.type!r} yielded no samples")
    store.write_json(f"{out}/summary.json", summary)  # written last: its presence marks a complete curation
    return summary
