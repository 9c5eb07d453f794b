"""Replay (TiC-CLIP): a seeded sample of what an earlier model was trained on, mixed into a run's
training data so that a retrain on new data keeps what the champion knew.

The pool is the data of one model: the curated shards of its manifest and, when it replayed
itself, its replayed shards. Through the champion the pool is what the champion saw, so data
from older retrains fades geometrically (TiC-CLIP's exponential replay) while the size of each
run's training data stays bounded. The sample is copied into the run's store as tar shards with
their index, read from the pool's shards by ranged reads: replayed data is read like curated data
and outlives the pool's store. ``replay.json`` beside them is the result and the URIs of its
shards: the next replay's pool when this run's model becomes champion.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from clipforge.core.components import Sample
from clipforge.core.errors import ConfigError
from clipforge.core.hashing import content_hash
from clipforge.core.recipe import Recipe
from clipforge.core.results import ReplayResult
from clipforge.core.storage import Store
from clipforge.engine.curation.layout import SUMMARY, curation_folder, write_parquet
from clipforge.engine.shards import Decoded, decode, index_of, iter_shard, read_index, read_samples, write_shards

#: Beside the replayed shards: the :class:`ReplayResult` and ``shard_uris``.
REPLAY_INDEX = "replay.json"


@dataclass(frozen=True)
class Source:
    """A shard of the pool: where it is, how many samples it holds, its sha256."""

    uri: str
    samples: int
    sha256: str


def sources_of(manifest: str, replayed: str | None = None, options: dict[str, Any] | None = None) -> list[Source]:
    """The shards a model trained on: the curated ones of ``manifest`` and those its replay wrote
    (``replayed``: that replay's ``replay.json`` URI)."""
    root, out = curation_folder(manifest, "data.replay")
    store = Store(root, options)
    if not store.exists(f"{out}/{SUMMARY}"):
        raise ConfigError(f"data.replay: {manifest}: no complete curation there ({store.uri(out, SUMMARY)} is missing)")
    # a curation's shards lie in its folder, a mixture's in its sources' folders beside it: their paths
    # are under the root of the store that wrote them, which may have moved since
    shards = store.read_json(f"{out}/{SUMMARY}")["shards"]
    sources = [Source(store.uri(*s["path"].rsplit("/", 2)[-2:]), s["samples"], s["sha256"]) for s in shards]
    if replayed:
        folder, name = replayed.rsplit("/", 1)
        replay_store = Store(folder, options)
        if not replay_store.exists(name):
            raise ConfigError(f"data.replay: the replayed data {replayed} is gone; its model's pool is incomplete")
        sources += [Source(**s) for s in replay_store.read_json(name)["shard_uris"]]
    return sources


def replay_count(fraction: float, new: int) -> int:
    """How many replayed pairs make ``fraction`` of a training mix with ``new`` pairs of new data."""
    return round(fraction * new / (1 - fraction))


def replay(
    recipe: Recipe, store: Store, new: int, sources: list[Source], source: str, *, progress: bool = True
) -> ReplayResult | None:
    """Copy the replayed share of a training mix with ``new`` curated pairs from ``sources`` under
    ``replay/<key>`` of ``store`` (reused when that replay is already there); None when there is
    nothing to replay. ``source`` says where the pool came from, for lineage."""
    from tqdm.auto import tqdm

    spec = recipe.data.replay
    assert spec is not None, "the recipe has no data.replay"
    total = sum(s.samples for s in sources)
    take = min(replay_count(spec.fraction, new), total)
    if take == 0:
        return None
    identity = {"pool": [(s.sha256, s.samples) for s in sources], "take": take, "seed": spec.seed}
    key = content_hash(identity, 16, sort_keys=False)  # hashed in insertion order since replays were first stored
    out = f"replay/{key}"
    if store.exists(f"{out}/{REPLAY_INDEX}"):
        return ReplayResult.model_validate(store.read_json(f"{out}/{REPLAY_INDEX}")["result"])
    chosen = np.sort(np.random.default_rng(spec.seed).choice(total, size=take, replace=False))
    ends = np.cumsum([s.samples for s in sources])
    owner = np.searchsorted(ends, chosen, side="right")
    rows: dict[str, list[Any]] = {"key": [], "source": [], "position": []}

    def pairs() -> Iterator[Decoded]:
        for index in np.unique(owner):
            first = ends[index] - sources[index].samples
            positions = chosen[owner == index] - first
            for position, raw in zip(positions.tolist(), _read(sources[index], positions, recipe.storage.options), strict=True):
                for column, value in zip(rows, (raw["key"], sources[index].uri, position), strict=True):
                    rows[column].append(value)
                yield decode(Sample(raw["key"], raw["image"], raw["caption"], raw["label"], raw["meta"]), pixels=False)
                bar.update()

    with tqdm(total=take, desc="replay", unit="pair", disable=not progress) as bar:
        shards = write_shards(store, pairs(), lambda n: f"{out}/replay-{n:05d}.tar", recipe.parallel.shard_size)
    rows["shard"] = [s.path for s in shards for _ in range(s.samples)]
    digest = hashlib.sha256()
    for shard in shards:
        digest.update(shard.sha256.encode())
    result = ReplayResult(
        source=source, pool=total, pairs=take, fraction=take / (take + new), shards=shards,
        uri=store.uri(out, REPLAY_INDEX), content_hash=digest.hexdigest(),
    )  # fmt: skip
    write_parquet(store, f"{out}/manifest.parquet", rows)  # one row per pair: where it came from, where it is
    uris = [{"uri": store.uri(s.path), "samples": s.samples, "sha256": s.sha256} for s in shards]
    store.write_json(
        f"{out}/{REPLAY_INDEX}",
        {"result": result.model_dump(mode="json"), "shard_uris": uris, "pool": [asdict(s) for s in sources]},
    )
    return result


def _read(source: Source, positions: np.ndarray, options: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The samples at ``positions`` (sorted) of a pool shard: consecutive ones with one ranged read each."""
    folder, rel = source.uri.rsplit("/", 1)
    store = Store(folder, options)
    if not store.exists(index_of(rel)):  # a shard from before indexes: read it through
        wanted = set(positions.tolist())
        yield from (raw for p, raw in enumerate(iter_shard(store, rel)) if p in wanted)
        return
    offsets = read_index(store, rel)
    runs = np.split(positions, np.flatnonzero(np.diff(positions) != 1) + 1)
    for run in runs:
        yield from read_samples(store, rel, offsets, int(run[0]), len(run))
