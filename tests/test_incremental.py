"""Incremental curation: a new crawl curated against the pool curated before it (its manifest, or the
champion's through its lineage), from the pool's stored features, never recomputed."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import clipforge
from clipforge.core.storage import Store
from clipforge.core.validation import load_recipe
from clipforge.engine.curation import curate, curation_key, open_pool
from clipforge.plugins.curation import duplicates
from tests.crawls import CrawlSample, encode, planted_crawl, write_shards

DEDUP = [{"type": "exact-duplicates"}, {"type": "near-duplicates", "threshold": 0.95}]


def _recipe(tmp_path, urls: str, steps: list, pool: dict | None = None) -> clipforge.Recipe:
    return load_recipe({
        "name": "weekly", "storage": {"root": str(tmp_path / "store")},
        "data": {"train": {"type": "webdataset", "urls": urls}},
        "curation": steps, "model": {"type": "open-clip", "arch": "RN50"},
        **({"curation_pool": pool} if pool else {}),
    })  # fmt: skip


def _curate(tmp_path, recipe, **kw):
    store = Store(recipe.storage.root)
    pool = kw.pop("pool", None)
    out = f"curated/{curation_key(recipe, pool)}"
    summary = curate(recipe, clipforge.get_plugin_manager().catalog, store, out, progress=False, pool=pool, **kw)
    rows = {r["key"]: r for r in pq.read_table(store.path(summary.manifest)).to_pylist()}
    return summary, rows


def _noisy(image: bytes, seed: int) -> bytes:
    pixels = np.asarray(Image.open(io.BytesIO(image)).convert("RGB")).astype(np.int16)
    noise = np.random.default_rng(seed).integers(-6, 7, pixels.shape)
    return encode(np.clip(pixels + noise, 0, 255).astype(np.uint8))


@pytest.fixture
def counted(monkeypatch):
    """How many samples each deduplication step computed features of."""
    calls = {"exact": 0, "near": 0}
    for name, cls in (("exact", duplicates.ExactDuplicates), ("near", duplicates.NearDuplicates)):
        original = cls.features

        def features(self, samples, _original=original, _name=name):
            calls[_name] += len(samples)
            return _original(self, samples)

        monkeypatch.setattr(cls, "features", features)
    return calls


def test_a_second_crawl_drops_its_copies_of_the_pool_naming_them(tmp_path, counted):
    week1, groups = planted_crawl([4, 9], singles=30, seed=1, prefix="a")
    urls1 = write_shards(tmp_path / "week1", week1, per_shard=15)
    first, rows1 = _curate(tmp_path, _recipe(tmp_path, urls1, DEDUP))
    assert counted == {"exact": len(week1), "near": len(week1)}
    kept1 = [s for s in week1 if rows1[s.key]["kept"]]
    dropped1 = [s for s in week1 if not rows1[s.key]["kept"]]
    representative = {k: g[0] for g in groups for k in g}  # a dropped week-1 image's kept first copy

    # week 2: exact and near copies of kept and of dropped week-1 images, new images, and a group of its own
    copies: dict[str, str] = {}  # week-2 key -> the week-1 key its drop must name
    week2: list[CrawlSample] = []
    for i, source in enumerate([*kept1[:6], *dropped1[:4]]):
        for how in ("same", "near"):
            key = f"b{len(week2):04d}"
            image = source.image if how == "same" else _noisy(source.image, i)
            week2.append(CrawlSample(key, image, f"copy {how} of {source.key}", "png"))
            copies[key] = representative.get(source.key, source.key)
    fresh, own = planted_crawl([3], singles=12, seed=2, prefix="c")
    week2 += fresh
    rng = np.random.default_rng(0)
    week2 = [week2[i] for i in rng.permutation(len(week2))]
    urls2 = write_shards(tmp_path / "week2", week2, per_shard=9)

    counted.update(exact=0, near=0)
    pool = open_pool(first.manifest_uri)
    second, rows2 = _curate(tmp_path, _recipe(tmp_path, urls2, DEDUP, {"manifest": first.manifest_uri}), pool=pool)
    assert counted == {"exact": len(week2), "near": len(week2)}  # the new crawl's features only: the pool's are read
    for key, source in copies.items():
        row = rows2[key]
        assert (row["kept"], row["reason"], row["detail"]) == (
            False,
            "duplicate of pool",
            f"duplicate of {source} in {first.manifest_uri}",
        ), row
    order = [s.key for s in week2]
    first_own = min(own[0], key=order.index)  # the new crawl's own group keeps its first copy, as without a pool
    assert {s.key for s in fresh if rows2[s.key]["kept"]} == {s.key for s in fresh} - set(own[0]) | {first_own}
    assert second.pool == first.manifest_uri
    schema = pq.read_schema(Store(str(tmp_path / "store")).path(second.manifest))
    assert schema.metadata[b"clipforge.pool"].decode() == first.manifest_uri
    assert second.funnel["exact-duplicates"].reasons["duplicate of pool"] + second.funnel["near-duplicates"].reasons[
        "duplicate of pool"
    ] == len(copies)

    # week 3, against week 2's manifest: the pool is week 2 and, through it, week 1
    week3 = [CrawlSample("d0000", kept1[0].image, "again", "png"), CrawlSample("d0001", fresh[0].image, "again", "png"),
             CrawlSample("d0002", encode(np.zeros((48, 48, 3), dtype=np.uint8) + 7), "new", "png")]  # fmt: skip
    urls3 = write_shards(tmp_path / "week3", week3, per_shard=5)
    chain = open_pool(second.manifest_uri)
    assert [c.manifest for c in chain.curations] == [first.manifest_uri, second.manifest_uri]
    _, rows3 = _curate(tmp_path, _recipe(tmp_path, urls3, DEDUP, {"manifest": second.manifest_uri}), pool=chain)
    assert rows3["d0000"]["detail"] == f"duplicate of {kept1[0].key} in {first.manifest_uri}"
    fresh_first = fresh[0].key if fresh[0].key not in own[0] else first_own
    assert rows3["d0001"]["detail"] == f"duplicate of {fresh_first} in {second.manifest_uri}"
    assert rows3["d0002"]["kept"]


def test_a_pool_without_the_features_a_step_needs_is_refused_before_any_work(tmp_path):
    samples, _ = planted_crawl([2], singles=4, seed=3, prefix="a")
    urls = write_shards(tmp_path / "w1", samples, per_shard=10)
    first, _ = _curate(tmp_path, _recipe(tmp_path, urls, [{"type": "exact-duplicates"}]))
    recipe = _recipe(tmp_path, urls, DEDUP, {"manifest": first.manifest_uri})
    with pytest.raises(
        clipforge.ConfigError, match=r"holds no features of a 'near-duplicates' step with \{'embedding': 'thumbnail'\}"
    ):
        _curate(tmp_path, recipe, pool=open_pool(first.manifest_uri))
    with pytest.raises(clipforge.ConfigError, match="no complete curation there"):
        open_pool(str(tmp_path / "store" / "curated" / "nothing" / "manifest.parquet"))
    with pytest.raises(clipforge.ConfigError, match="is not a curated manifest"):
        open_pool(str(tmp_path / "store" / "summary.json"))
    Store(str(tmp_path / "store")).fs.rm(Store(str(tmp_path / "store")).path(f"{first.out}/features.json"))
    with pytest.raises(clipforge.ConfigError, match="has no stored features"):
        open_pool(first.manifest_uri)


def test_the_recipe_names_the_pool_and_a_different_pool_is_a_different_curation(tmp_path):
    samples, _ = planted_crawl([3], singles=5, seed=4, prefix="a")
    urls = write_shards(tmp_path / "w1", samples, per_shard=10)
    first, _ = _curate(tmp_path, _recipe(tmp_path, urls, DEDUP))
    again = _recipe(tmp_path, urls, DEDUP, {"manifest": first.manifest_uri})
    store = Store(again.storage.root)
    # without pool=, curate() takes the recipe's manifest: the same crawl against itself keeps nothing new
    summary = curate(again, clipforge.get_plugin_manager().catalog, store, "against-itself", progress=False)
    assert summary.kept == 0 and summary.pool == first.manifest_uri
    pool = open_pool(first.manifest_uri)
    assert curation_key(again, pool) != curation_key(again)
    assert curation_key(again, pool) != curation_key(again, open_pool(first.manifest_uri, statistics=False))


def test_whole_dataset_statistics_count_the_pool(tmp_path):
    """A clip-score top fraction is taken over the pool's scores and the new ones; an entry's cap counts the pool's pairs."""
    import torch

    from clipforge.core.checkpoint import save_open_clip_dir
    from clipforge.core.components import Pool
    from clipforge.plugins.curation.balance import Balance
    from tests.conftest import TINY_CONFIG

    torch.manual_seed(0)
    bundle = clipforge.get_plugin_manager().catalog.create("encoders", {"type": "open-clip", "config": TINY_CONFIG})
    scorer = str(save_open_clip_dir(bundle, tmp_path / "scorer"))
    steps = [{"type": "clip-score", "model": scorer, "fraction": 0.5}, {"type": "balance", "entries": ["cat", "猫"], "t": 3}]
    # varied captions: the tiny scoring model's scores follow the text, so one caption repeated would score as one
    captions = [f"{c} {i}" for i in range(20) for c in ("a cat", "黒い猫", "a dog")]
    week1, _ = planted_crawl([], singles=40, seed=5, prefix="a", captions=captions)
    week2, _ = planted_crawl([], singles=60, seed=6, prefix="b", captions=captions[::-1])
    first, rows1 = _curate(tmp_path, _recipe(tmp_path, write_shards(tmp_path / "w1", week1, 10), steps))
    urls2 = write_shards(tmp_path / "w2", week2, 10)
    balance = Balance(entries=["cat", "猫"], t=3)
    in_pool = [s for s in week1 if rows1[s.key]["kept"]]
    pool_matches = balance.features([clipforge.Sample(s.key, None, s.caption) for s in in_pool])
    for statistics in (True, False):
        recipe = _recipe(tmp_path, urls2, steps, {"manifest": first.manifest_uri, "statistics": statistics})
        _, rows2 = _curate(tmp_path, recipe, pool=open_pool(first.manifest_uri, statistics=statistics))
        # the top half of the pool's scores and the new ones together (of the new ones alone without statistics)
        old = [rows1[s.key]["clip-score/score"] for s in week1] if statistics else []
        new = [rows2[s.key]["clip-score/score"] for s in week2]
        ranked = np.argsort(-np.asarray(old + new), kind="stable")[: round(0.5 * (len(old) + len(new)))]
        top = [week2[i - len(old)] for i in sorted(ranked.tolist()) if i >= len(old)]
        assert {s.key for s in top} == {s.key for s in week2 if rows2[s.key]["step"] != "clip-score"}
        # the caps: what the pool kept of an entry counts towards it
        pool = Pool(keys=[s.key for s in in_pool], features=pool_matches, kept=[True] * len(in_pool), statistics=statistics)
        matches = balance.features([clipforge.Sample(s.key, None, s.caption) for s in top])
        expected = balance.decide_against([s.key for s in top], matches, pool)
        assert [rows2[s.key]["kept"] for s in top] == [v.keep for v in expected]
        if statistics:  # and the pool made a difference here
            assert [v.keep for v in expected] != [v.keep for v in balance.decide([s.key for s in top], matches)]


@pytest.mark.slow
def test_the_curate_flow_finds_the_champions_curated_data_through_its_lineage(tmp_path, tracking, prefect_server):
    from clipforge.flows.curate import curate_flow
    from clipforge.flows.stage import new_run_id, start_run
    from clipforge.registry import register_version, set_champion

    week1, _ = planted_crawl([2], singles=6, seed=7, prefix="a")
    week2 = [CrawlSample("b0000", week1[0].image, "a copy", "png"), CrawlSample("b0001", week1[1].image, "a copy", "png")]
    week2 += planted_crawl([], singles=3, seed=8, prefix="c")[0]
    urls1, urls2 = write_shards(tmp_path / "w1", week1, 5), write_shards(tmp_path / "w2", week2, 5)
    pool = {"from": "champion", "model_name": "weekly-clip"}
    # no champion yet: the first crawl is curated alone
    recipe = _recipe(tmp_path, urls1, DEDUP, pool)
    first = curate_flow(start_run(recipe, new_run_id()).run_id, recipe.storage)
    assert first.pool is None
    version = register_version("models/any", "weekly-clip", tags={"clipforge.manifest_uri": first.manifest_uri},
                               metrics={}, run_id=None)  # fmt: skip
    set_champion("weekly-clip", version.version, reason="the first model")
    recipe = _recipe(tmp_path, urls2, DEDUP, pool)
    second = curate_flow(start_run(recipe, new_run_id()).run_id, recipe.storage)
    assert second.pool == first.manifest_uri
    rows = {r["key"]: r for r in pq.read_table(Store(str(tmp_path / "store")).path(second.manifest)).to_pylist()}
    assert [rows[k]["reason"] for k in ("b0000", "b0001")] == ["duplicate of pool"] * 2
    assert all(rows[s.key]["kept"] for s in week2[2:])
