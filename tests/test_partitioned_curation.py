"""A curation whose reduce phase runs in partitions (``parallel.reduce_partitions``) leaves the manifest
of the one-process curation: against a pool too, and as the curate flow's tasks on Dask and on Ray."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

import clipforge
from clipforge.core.storage import Store
from clipforge.core.validation import load_recipe
from clipforge.engine.curation import curate, curation_key, open_pool
from tests.crawls import CrawlSample, planted_crawl, write_shards

STEPS = [
    {"type": "exact-duplicates"},
    {"type": "near-duplicates", "threshold": 0.95},
    {"type": "balance", "entries": ["photo", "copy", "numbered"], "t": 6, "keep_unmatched": True},
]
COLUMNS = ["key", "kept", "step", "reason", "detail"]


def _recipe(root, urls: str, steps=STEPS, pool: str | None = None, **parallel) -> clipforge.Recipe:
    return load_recipe({
        "name": "weekly", "storage": {"root": str(root)},
        "data": {"train": {"type": "webdataset", "urls": urls}},
        "curation": steps, "model": {"type": "open-clip", "arch": "RN50"},
        "parallel": {"runner": "threads", **parallel},
        **({"curation_pool": {"manifest": pool}} if pool else {}),
    })  # fmt: skip


def _curate(recipe: clipforge.Recipe, pool=None, calls: list[str] | None = None):
    store = Store(recipe.storage.root)

    def mapper(fn, jobs):  # the builtin map, noting which tasks ran
        (calls if calls is not None else []).append(fn.__name__)
        return map(fn, jobs)

    summary = curate(recipe, clipforge.get_plugin_manager().catalog, store, f"curated/{curation_key(recipe, pool)}",
                     progress=False, pool=pool, mapper=mapper)  # fmt: skip
    table = pq.read_table(store.path(summary.manifest))
    rows = table.select(COLUMNS).to_pylist()
    scores = {n: table.column(n).to_pylist() for n in table.column_names if "/" in n}
    return summary, rows, scores, store


def _crawls(tmp_path):
    week1, _ = planted_crawl([5, 3, 7], singles=14, seed=3, prefix="a")
    week2, _ = planted_crawl([4], singles=6, seed=4, prefix="b")
    copies = [CrawlSample(f"c{i:03d}", s.image, f"a copy of {s.key}", "png") for i, s in enumerate(week1[::4])]
    week2 = [x for pair in zip(week2, copies) for x in pair] + week2[len(copies) :]  # copies of the pool spread over parts
    return write_shards(tmp_path / "week1", week1, per_shard=7), write_shards(tmp_path / "week2", week2, per_shard=5)


def test_a_curation_in_partitions_leaves_the_one_process_manifest_against_a_pool_too(tmp_path):
    urls1, urls2 = _crawls(tmp_path)
    results = {}
    for partitions in (1, 4):
        root, calls = tmp_path / f"store-{partitions}", []
        first, rows1, scores1, store = _curate(_recipe(root, urls1, reduce_partitions=partitions), calls=calls)
        pool = open_pool(first.manifest_uri)
        second, rows2, scores2, _ = _curate(
            _recipe(root, urls2, pool=first.manifest_uri, reduce_partitions=partitions), pool, calls
        )
        tasks = {"survey_block", "route_block", "link_partition", "decide_block"}
        assert (tasks <= set(calls)) == (partitions > 1), calls
        assert not store.exists(f"{first.manifest.rsplit('/', 1)[0]}/reduce-partitions/near-duplicates")  # shares removed
        # the pool's manifest is named in the details: the same curation, on another store
        rows2 = [{**r, "detail": r["detail"].replace(str(root), "ROOT")} for r in rows2]
        results[partitions] = (first.funnel, rows1, scores1, second.funnel, rows2, scores2)
    one, many = results[1], results[4]
    assert one[0] == many[0] and one[3] == many[3]
    assert one[1] == many[1] and one[4] == many[4]
    for a, b in ((one[2], many[2]), (one[5], many[5])):
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_allclose(np.array(a[name], dtype=float), np.array(b[name], dtype=float), atol=1e-6)
    assert (
        one[3]["near-duplicates"].reasons.get("duplicate of pool", 0)
        + one[3]["exact-duplicates"].reasons.get("duplicate of pool", 0)
        >= 4
    )  # the copies of the pool were found, in every partition they fell in


def test_reduce_partitions_is_checked_with_the_recipe(tmp_path):
    with pytest.raises(clipforge.RecipeError, match=r"parallel.reduce_partitions"):
        _recipe(tmp_path, "x-{0..1}.tar", reduce_partitions=0)
    with pytest.raises(clipforge.RecipeError, match=r"parallel.reduce_partitions"):
        _recipe(tmp_path, "x-{0..1}.tar", reduce_partitions="many")
    assert _recipe(tmp_path, "x-{0..1}.tar", reduce_partitions="auto").parallel.reduce_partitions == "auto"


def _flow_matches_one_process(tmp_path, runner: str) -> None:
    from clipforge.flows.curate import curate_flow
    from clipforge.flows.stage import new_run_id, start_run

    samples, _ = planted_crawl([5, 3], singles=12, seed=5, prefix="a")
    urls = write_shards(tmp_path / "crawl", samples, per_shard=10)  # two parts: as few tasks as show the sequence
    steps = STEPS[1:2]  # near-duplicates: every phase of the protocol, its shares routed through the store
    recipe = _recipe(tmp_path / "store", urls, steps, runner=runner, workers=2, reduce_partitions=3)
    expected, *_ = _curate(_recipe(tmp_path / "ref", urls, steps))
    result = curate_flow(start_run(recipe, new_run_id()).run_id, recipe.storage)
    assert result.content_hash == expected.content_hash and result.funnel == expected.funnel


@pytest.mark.slow
def test_the_flow_reduces_in_partitions_on_dask(tmp_path, tracking, prefect_server):
    _flow_matches_one_process(tmp_path, "dask")


@pytest.mark.slow
def test_the_flow_reduces_in_partitions_on_a_ray_runtime(tmp_path, tracking, prefect_server, monkeypatch):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        _flow_matches_one_process(tmp_path, "ray")
    finally:
        ray.shutdown()
