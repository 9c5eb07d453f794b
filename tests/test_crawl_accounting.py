"""A crawl as img2dataset leaves it, with planted groups of copies and captions in many languages:
curation accounts for every input key exactly once, and the funnel's counts chain."""

from __future__ import annotations

import itertools

import pyarrow.parquet as pq

import clipforge
from clipforge.core.storage import Store
from clipforge.core.validation import load_recipe
from clipforge.engine.curation import curate
from clipforge.engine.shards import iter_shard
from tests.crawls import planted_crawl, write_shards

CAPTIONS = [
    "a black cat sleeping on a sofa", "un café au lait sur la table", "naïve Malerei über dem Sofa",
    "東京タワーの夜景", "北京的猫在睡觉", "แมวดำนอนบนโซฟา", "кот спит на диване", "ένας μαύρος σκύλος",
    "قطة سوداء نائمة", "서울 타워의 야경", "learning C++ on a laptop", "ok", "Ein HUND im Schnee",
    "a dog in the snow", "東京", "la tour Eiffel la nuit",
]  # fmt: skip
ENTRIES = ["cat", "café", "über", "東京", "猫", "แมว", "кот", "σκύλος", "قطة", "서울", "c++", "dog", "hund", "eiffel"]


def test_every_input_key_is_accounted_for_exactly_once(tmp_path):
    sizes = [2, 3, 7, 25, 120]
    samples, groups = planted_crawl(sizes, singles=150, seed=11, captions=CAPTIONS)
    urls = write_shards(tmp_path / "crawl", samples, per_shard=40)
    recipe = load_recipe({
        "name": "crawl", "storage": {"root": str(tmp_path / "store")},
        "data": {"train": {"type": "webdataset", "urls": urls}},
        "curation": [
            {"type": "caption-length", "min_words": 1, "min_chars": 3},
            {"type": "image-size", "min_side": 16},
            {"type": "exact-duplicates"},
            {"type": "near-duplicates", "threshold": 0.95},
            {"type": "balance", "entries": ENTRIES, "t": 15, "keep_unmatched": True},
        ],
        "model": {"type": "open-clip", "arch": "RN50"}, "parallel": {"shard_size": 50},
    })  # fmt: skip
    store = Store(recipe.storage.root)
    summary = curate(recipe, clipforge.get_plugin_manager().catalog, store, "cur", progress=False)
    rows = pq.read_table(store.path(summary.manifest)).to_pylist()
    keys = [r["key"] for r in rows]
    assert sorted(keys) == sorted(s.key for s in samples) and len(set(keys)) == len(keys) == summary.input
    kept = {r["key"] for r in rows if r["kept"]}
    in_shards = [s["key"] for shard in summary.shards for s in iter_shard(store, shard.path)]
    assert sorted(in_shards) == sorted(kept) and summary.kept == len(kept)
    assert all((r["step"], r["reason"]) == ("", "") for r in rows if r["kept"])
    assert all(r["step"] and r["reason"] for r in rows if not r["kept"])
    # the funnel chains: each step sees what the one before it kept, and the drops add up
    funnel = list(summary.funnel.values())
    for before, after in itertools.pairwise(funnel):
        assert after.seen == before.kept
    assert funnel[-1].kept == summary.kept
    assert sum(v.dropped for v in funnel) == summary.input - summary.kept
    by_key = {r["key"]: r for r in rows}
    # deduplication holds in the curation: of each group's copies that pass the per-sample filters, the first
    # passes both deduplication steps (kept, or capped by balance) and every other one is dropped by them
    for group in groups:
        reached = [
            k for k in group if by_key[k]["kept"] or by_key[k]["step"] in ("exact-duplicates", "near-duplicates", "balance")
        ]
        assert reached, group
        assert by_key[reached[0]]["kept"] or by_key[reached[0]]["step"] == "balance"
        assert all(by_key[k]["step"] in ("exact-duplicates", "near-duplicates") for k in reached[1:])
    # the multilingual captions met their entries: the short one ("ok") went at caption-length, the others were matched
    matched = {s.caption for s in samples if by_key[s.key]["step"] == "balance" or by_key[s.key]["kept"]}
    assert {"東京タワーの夜景", "北京的猫在睡觉", "แมวดำนอนบนโซฟา", "서울 타워의 야경"} <= matched
    assert {by_key[s.key]["reason"] for s in samples if s.caption == "ok"} == {"too short (2 < 3 chars)"}
