"""Deduplication that holds for groups of any size: exactly one image kept per connected group of
copies, the first in input order, through the step alone and through a real curation."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

import clipforge
from clipforge.core.components import Pool
from clipforge.core.storage import Store
from clipforge.core.validation import load_recipe
from clipforge.engine.curation import curate
from clipforge.plugins.curation.duplicates import POOL_DUPLICATE, ExactDuplicates, NearDuplicates, near_groups, near_pairs
from tests.crawls import planted_crawl, write_shards

THRESHOLD = 0.97


def truth_components(x: np.ndarray, threshold: float) -> np.ndarray:
    """Connected components of the pairs at or above the threshold, every pair compared: the reference."""
    sims = x @ x.T
    return connected_components(sims >= threshold, directed=False)[1]


def grouped_vectors(rng: np.random.Generator, sizes: list[int], dim: int, spread: float) -> np.ndarray:
    """Groups of near and identical copies around random centres, shuffled; unit rows, float16 as the parts store them."""
    rows = []
    for size in sizes:
        centre = rng.standard_normal(dim)
        for m in range(size):
            rows.append(rows[-1] if m and m % 3 == 0 else centre / np.linalg.norm(centre) + spread * rng.standard_normal(dim))
    x = np.array(rows)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x[rng.permutation(len(x))].astype(np.float16).astype(np.float32)  # as reduce hands them to decide


def check_invariant(keys: list[str], x: np.ndarray, verdicts: list[clipforge.Verdict], threshold: float) -> None:
    """Exactly one kept per connected component, the first in order; every dropped one names the kept one of its group."""
    component = truth_components(x, threshold)
    kept_of = {}
    for i, c in enumerate(component):
        kept_of.setdefault(c, i)
    for i, (v, c) in enumerate(zip(verdicts, component)):
        first = kept_of[c]
        if i == first:
            assert v.keep, (i, v)
        else:
            assert not v.keep and v.reason == "near duplicate" and v.detail == f"of {keys[first]}", (i, v, keys[first])
            assert v.scores["similarity"] >= threshold - 1e-6


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=10),
    dim=st.sampled_from([8, 16, 64]),
    spread=st.floats(0.0, 0.15),
    seed=st.integers(0, 2**32 - 1),
)
def test_near_duplicates_keep_exactly_the_first_of_every_connected_group(sizes, dim, spread, seed):
    x = grouped_vectors(np.random.default_rng(seed), sizes, dim, spread)
    sims = x @ x.T
    assume(not np.any(np.abs(sims - THRESHOLD) < 1e-4))  # no pair on the edge, where float rounding could decide
    keys = [f"k{i}" for i in range(len(x))]
    check_invariant(keys, x, NearDuplicates(threshold=THRESHOLD).decide(keys, x), THRESHOLD)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 30), min_size=1, max_size=8),
    pool_share=st.floats(0.0, 1.0),
    spread=st.floats(0.0, 0.1),
    seed=st.integers(0, 2**32 - 1),
)
def test_against_a_pool_every_copy_of_a_pool_image_goes_and_the_rest_keep_one_per_group(sizes, pool_share, spread, seed):
    rng = np.random.default_rng(seed)
    x = grouped_vectors(rng, sizes, 16, spread)
    assume(not np.any(np.abs(x @ x.T - THRESHOLD) < 1e-4))
    p = int(pool_share * len(x))
    kept_in_pool = rng.random(p) < 0.8  # what the pool's curation dropped is not in the pool
    pool = Pool(keys=[f"p{i}" for i in range(p)], features=x[:p], kept=kept_in_pool.tolist(),
                manifests=["s3://b/curated/a/manifest.parquet"], ends=[p])  # fmt: skip
    keys = [f"k{i}" for i in range(p, len(x))]
    verdicts = NearDuplicates(threshold=THRESHOLD).decide_against(keys, x[p:], pool)
    live = np.concatenate([np.flatnonzero(kept_in_pool), np.arange(p, len(x))])  # the pool's curated data, then the new
    component = dict(zip(live.tolist(), truth_components(x[live], THRESHOLD).tolist()))
    pool_member = {}
    for i in np.flatnonzero(kept_in_pool).tolist():
        pool_member.setdefault(component[i], i)
    first_new = {}
    for i, v in zip(range(p, len(x)), verdicts):
        c = component[i]
        if c in pool_member:
            assert not v.keep and v.reason == POOL_DUPLICATE
            assert v.detail == f"duplicate of p{pool_member[c]} in s3://b/curated/a/manifest.parquet"
        elif c not in first_new:
            first_new[c] = i
            assert v.keep
        else:
            assert not v.keep and v.reason == "near duplicate" and v.detail == f"of k{first_new[c]}"


@settings(max_examples=60, deadline=None)
@given(digests=st.lists(st.sampled_from("abcdefgh"), max_size=60), n_pool=st.integers(0, 10))
def test_exact_duplicates_keep_the_first_of_each_digest_and_drop_copies_of_the_pool(digests, n_pool):
    pool_digests, new = digests[:n_pool], digests[n_pool:]
    pool = Pool(keys=[f"p{i}" for i in range(len(pool_digests))], features=pool_digests, kept=[True] * len(pool_digests),
                manifests=["m.parquet"], ends=[len(pool_digests)])  # fmt: skip
    keys = [f"k{i}" for i in range(len(new))]
    verdicts = ExactDuplicates().decide_against(keys, new, pool)
    for i, (d, v) in enumerate(zip(new, verdicts)):
        if d in pool_digests:
            assert (v.keep, v.reason, v.detail) == (False, POOL_DUPLICATE, f"duplicate of p{pool_digests.index(d)} in m.parquet")
        elif new.index(d) == i:
            assert v.keep
        else:
            assert (v.keep, v.reason, v.detail) == (False, "exact duplicate", f"of k{new.index(d)}")
    assert [v.keep for v in ExactDuplicates().decide(keys, new)] == [new.index(d) == i for i, d in enumerate(new)]


@pytest.mark.parametrize("sizes", [[10, 20, 50, 200], [30 + 20], [2, 3, 5, 500]])
def test_big_clusters_keep_one_image_each(sizes):
    """The clusters that kept 1, 4, 11 and 44 images (and 16 of 30 identical + 20 near copies) keep one."""
    x = grouped_vectors(np.random.default_rng(7), [*sizes, *[1] * 2000], 256, 0.004)
    keys = [f"k{i}" for i in range(len(x))]
    verdicts = NearDuplicates(threshold=THRESHOLD).decide(keys, x)
    assert sum(v.keep for v in verdicts) == len(x) - sum(sizes) + len(sizes)
    check_invariant(keys, x, verdicts, THRESHOLD)


def test_the_search_by_cells_holds_groups_of_hundreds_without_comparing_all_pairs():
    """Above the exact search's size, groups of 2 to 500 copies among 15,000 vectors still keep one each."""
    rng = np.random.default_rng(3)
    sizes = [2, 3, 5, 10, 20, 50, 200, 500, *[int(s) for s in rng.integers(2, 40, 60)]]
    x = grouped_vectors(rng, [*sizes, *[1] * (15_000 - sum(sizes))], 64, 0.01)
    first, _ = near_groups(x, THRESHOLD, exact_below=10_000)
    # the reference: every pair compared (the exact search, held to brute force by the tests above)
    i, j, _ = near_pairs(x, THRESHOLD, exact_below=len(x) + 1)
    truth = connected_components(coo_matrix((np.ones(len(i)), (i, j)), shape=(len(x), len(x))), directed=False)[1]
    # the groups found are exactly the true ones: each true group has one first member, shared by all of it
    assert len(set(first.tolist())) == truth.max() + 1 == len(x) - sum(sizes) + len(sizes)
    assert all(len(set(truth[first == f].tolist())) == 1 for f in set(first.tolist()))
    a, b, sims = near_pairs(x, THRESHOLD, exact_below=10_000)
    assert len(np.intersect1d(a * len(x) + b, i * len(x) + j)) >= 0.99 * len(i) and np.all(sims >= THRESHOLD)


def test_a_curation_keeps_the_first_image_of_every_planted_group_across_shards(tmp_path):
    """Groups of 2 to 350 copies (identical, re-encoded, speckled, resized) spread over five shards."""
    sizes = [2, 3, 5, 10, 20, 50, 200, 350]
    samples, groups = planted_crawl(sizes, singles=200, seed=1)
    urls = write_shards(tmp_path / "crawl", samples, per_shard=len(samples) // 5 + 1)
    recipe = load_recipe({
        "name": "dedup", "storage": {"root": str(tmp_path / "store")},
        "data": {"train": {"type": "webdataset", "urls": urls}},
        "curation": [{"type": "near-duplicates", "threshold": 0.95}],
        "model": {"type": "open-clip", "arch": "RN50"},
    })  # fmt: skip
    store = Store(recipe.storage.root)
    summary = curate(recipe, clipforge.get_plugin_manager().catalog, store, "cur", progress=False)
    rows = {r["key"]: r for r in pq.read_table(store.path(summary.manifest)).to_pylist()}
    assert len(rows) == len(samples) == summary.input
    for keys in groups:
        assert rows[keys[0]]["kept"], keys[0]
        for key in keys[1:]:
            assert (rows[key]["kept"], rows[key]["reason"], rows[key]["detail"]) == (False, "near duplicate", f"of {keys[0]}")
    assert summary.kept == len(samples) - sum(sizes) + len(sizes)
    assert summary.funnel["near-duplicates"].reasons == {"near duplicate": sum(sizes) - len(sizes)}


def test_the_index_search_finds_nearly_every_link_and_refuses_partitions():
    """``search: index`` (one process, fast where no exact bound prunes) finds 99 % of the links of
    groups of 2 to 500 copies among 15,000 vectors; a partitioned decision refuses it by name."""
    from clipforge.plugins.curation.duplicates import indexed_pairs

    rng = np.random.default_rng(5)
    sizes = [2, 3, 5, 10, 20, 50, 200, 500, *[int(s) for s in rng.integers(2, 40, 60)]]
    x = grouped_vectors(rng, [*sizes, *[1] * (15_000 - sum(sizes))], 64, 0.01)
    i, j, _ = near_pairs(x, THRESHOLD, exact_below=len(x) + 1)
    a, b, sims = indexed_pairs(x, THRESHOLD, exact_below=10_000)
    assert len(np.intersect1d(a * len(x) + b, i * len(x) + j)) >= 0.99 * len(i) and np.all(sims >= THRESHOLD)
    keys = [f"k{n}" for n in range(len(x))]
    verdicts = NearDuplicates(threshold=THRESHOLD, search="index").decide(keys, x)
    assert sum(v.keep for v in verdicts) >= len(x) - sum(sizes) + len(sizes)  # a missed link keeps one more, never fewer
    with pytest.raises(clipforge.ConfigError, match="search: index decides in one process"):
        NearDuplicates(threshold=THRESHOLD, search="index").plan(None, [], 2)
