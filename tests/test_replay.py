"""Replay: a seeded sample of what an earlier model was trained on, copied into the run's store."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from clipforge.core.components import Sample
from clipforge.core.errors import ConfigError
from clipforge.core.recipe import Recipe
from clipforge.core.storage import Store
from clipforge.engine.replay import replay, replay_count, sources_of
from clipforge.engine.shards import ShardWriter, decode, index_of, iter_shard, write_index
from tests.conftest import TINY_CONFIG


def png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (i % 256, (i // 256) % 256, 7)).save(buf, "PNG")
    return buf.getvalue()


def curation(store: Store, out: str, sizes: list[int], *, prefix: str = "old", index: bool = True) -> str:
    """A curated folder holding shards of ``sizes`` samples (keys ``<prefix>-<n>``); its manifest's URI."""
    shards, n = [], 0
    for s, size in enumerate(sizes):
        writer = ShardWriter(store, f"{out}/shard-{s:06d}.tar")
        for _ in range(size):
            writer.add(decode(Sample(f"{prefix}-{n:06d}", png(n), f"caption {n}", n % 3, {"n": n})))
            n += 1
        shards.append(writer.close())
        if index:
            write_index(store, shards[-1]["path"], writer.offsets)
    store.write_json(f"{out}/summary.json", {"shards": shards})
    store.write_bytes(f"{out}/manifest.parquet", b"")
    return store.uri(out, "manifest.parquet")


def recipe(root: str, fraction: float, seed: int = 0, shard_size: int = 1000) -> Recipe:
    data: dict[str, Any] = {
        "storage": {"root": root},
        "data": {
            "train": {"type": "synthetic-shapes"},
            "replay": {"manifest": "x/y/manifest.parquet", "fraction": fraction, "seed": seed},
        },
        "model": {"type": "open-clip", "config": TINY_CONFIG},
        "loss": {"type": "clip"},
        "parallel": {"shard_size": shard_size},
        "registry": {"model_name": "m"},
        "name": "replay",
    }
    return Recipe.model_validate(data)


def keys(store: Store, result) -> list[str]:
    return [raw["key"] for s in result.shards for raw in iter_shard(store, s.path)]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=5),
    fraction=st.floats(0.05, 0.9),
    new=st.integers(0, 120),
    shard_size=st.integers(1, 30),
    seed=st.integers(0, 3),
)
def test_the_replayed_share_is_a_seeded_sample_of_the_pool(tmp_path_factory, sizes, fraction, new, shard_size, seed):
    """Whatever the pool's shards: ``fraction`` of the mix (all of the pool when it is smaller),
    distinct pairs of the pool with their bytes intact, the same ones for the same seed."""
    root = tmp_path_factory.mktemp("replay")
    pool_store, store = Store(str(root / "pool")), Store(str(root / "run"))
    manifest = curation(pool_store, "curated/a", sizes)
    sources = sources_of(manifest)
    r = recipe(str(root / "run"), fraction, seed, shard_size)
    result = replay(r, store, new, sources, "test", progress=False)
    want = min(replay_count(fraction, new), sum(sizes))
    if want == 0:
        assert result is None
        return
    assert result is not None and result.pairs == want and result.pool == sum(sizes)
    assert result.fraction == pytest.approx(want / (want + new))
    got = keys(store, result)
    assert len(got) == len(set(got)) == want and all(s.samples <= shard_size for s in result.shards)
    pool = {raw["key"]: raw for s in sources for raw in iter_shard(Store(s.uri.rsplit("/", 1)[0]), s.uri.rsplit("/", 1)[1])}
    for s in result.shards:
        for raw in iter_shard(store, s.path):
            assert raw["image"] == pool[raw["key"]]["image"] and raw["caption"] == pool[raw["key"]]["caption"]
            assert (raw["label"], raw["meta"]) == (pool[raw["key"]]["label"], pool[raw["key"]]["meta"])
        assert store.exists(index_of(s.path))
    import pyarrow.parquet as pq

    manifest_rows = pq.read_table(result.uri.rsplit("/", 1)[0] + "/manifest.parquet").to_pylist()
    assert [row["key"] for row in manifest_rows] == got
    for row in manifest_rows:  # each row leads back to the pool's pair
        (source,) = [s for s in sources if s.uri == row["source"]]
        folder, rel = source.uri.rsplit("/", 1)
        assert list(iter_shard(Store(folder), rel))[row["position"]]["key"] == row["key"]
        assert row["shard"] in {s.path for s in result.shards}
    again = replay(r, Store(str(root / "again")), new, sources, "test", progress=False)
    assert again is not None and keys(Store(str(root / "again")), again) == got


def test_replay_is_reused_and_seeds_differ(tmp_path):
    store = Store(str(tmp_path / "run"))
    sources = sources_of(curation(Store(str(tmp_path / "pool")), "curated/a", [50, 50, 50]))
    first = replay(recipe(str(tmp_path), 0.2), store, 200, sources, "test", progress=False)
    assert first is not None and first.pairs == 50
    assert replay(recipe(str(tmp_path), 0.2), store, 200, sources, "test", progress=False) == first
    other = replay(recipe(str(tmp_path), 0.2, seed=1), store, 200, sources, "test", progress=False)
    assert other is not None and set(keys(store, other)) != set(keys(store, first))
    # the sample is uniform over the pool: every shard contributes
    assert len({int(k[4:]) // 50 for k in keys(store, first)}) == 3


def test_the_pool_of_a_model_that_replayed_holds_its_replayed_data(tmp_path):
    """A champion trained on new data and a replay of the one before: both are its pool."""
    pool_store, store = Store(str(tmp_path / "pool")), Store(str(tmp_path / "run"))
    week1 = sources_of(curation(pool_store, "curated/w1", [30], prefix="w1"))
    replayed = replay(recipe(str(tmp_path), 0.5), store, 20, week1, "w1", progress=False)
    assert replayed is not None and replayed.pairs == 20
    week2 = sources_of(curation(pool_store, "curated/w2", [20], prefix="w2"), replayed.uri)
    assert sum(s.samples for s in week2) == 40
    third = replay(recipe(str(tmp_path), 0.5, seed=3), store, 40, week2, "w2", progress=False)
    assert third is not None and third.pairs == 40
    assert {k[:2] for k in keys(store, third)} == {"w1", "w2"}


def test_shards_without_an_index_are_read_through(tmp_path):
    pool_store, store = Store(str(tmp_path / "pool")), Store(str(tmp_path / "run"))
    sources = sources_of(curation(pool_store, "curated/a", [10, 7], index=False))
    result = replay(recipe(str(tmp_path), 0.5), store, 10, sources, "test", progress=False)
    assert result is not None and len(set(keys(store, result))) == 10


def test_bad_pools_name_what_is_wrong(tmp_path):
    with pytest.raises(ConfigError, match=r"data.replay: .*not a curated manifest"):
        sources_of(str(tmp_path / "a.parquet"))
    with pytest.raises(ConfigError, match=r"data.replay: .*summary.json is missing"):
        sources_of(str(tmp_path / "curated" / "x" / "manifest.parquet"))
    manifest = curation(Store(str(tmp_path)), "curated/a", [3])
    with pytest.raises(ConfigError, match="the replayed data .* is gone"):
        sources_of(manifest, str(tmp_path / "replay" / "k" / "replay.json"))


@pytest.mark.parametrize(
    "spec, error",
    [
        ({"fraction": 0.2}, "exactly one of 'from: champion' and 'manifest: URI'"),
        ({"from": "champion", "manifest": "a/b/manifest.parquet", "fraction": 0.2}, "exactly one"),
        ({"from": "champion", "fraction": 1.0}, "fraction"),
        ({"from": "champion", "fraction": 0}, "fraction"),
        ({"manifest": "a/b/manifest.parquet", "model_name": "x", "fraction": 0.2}, "model_name names"),
    ],
)
def test_replay_recipes_are_checked(spec, error):
    data = recipe("/tmp", 0.2).as_dict()
    data["data"]["replay"] = spec
    with pytest.raises(Exception, match=error):
        Recipe.model_validate(data)


def test_the_count_is_the_share_of_the_mix():
    for fraction in np.linspace(0.05, 0.95, 19):
        for new in (1, 10, 999, 10**6):
            n = replay_count(float(fraction), new)
            assert abs(n / (n + new) - fraction) <= 1 / (n + new)
