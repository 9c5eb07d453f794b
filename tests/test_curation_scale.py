"""Curation at scale: parts in parallel on Prefect task runners, resume, whole-dataset steps, bounded memory."""

from __future__ import annotations

import io
import tarfile
import tracemalloc

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import clipforge
from clipforge.core.storage import Store
from clipforge.core.validation import load_recipe
from clipforge.engine import curation
from clipforge.engine.shards import iter_shard


def _png(seed: int, size: int = 64) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _shards(folder, n_shards: int, per_shard: int, duplicate_of: dict[int, int] | None = None) -> str:
    """``n_shards`` tar shards; sample ``k`` reuses sample ``duplicate_of[k]``'s image."""
    duplicate_of = duplicate_of or {}
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with tarfile.open(folder / f"shard-{s:04d}.tar", "w") as tar:
            for j in range(per_shard):
                k = s * per_shard + j
                for name, data in (
                    (f"k{k:05d}.png", _png(duplicate_of.get(k, k))),
                    (f"k{k:05d}.txt", f"sample number {k}".encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / f"shard-{{0000..{n_shards - 1:04d}}}.tar")


def _recipe(tmp_path, urls: str, steps=(), **parallel):
    return load_recipe(
        {
            "name": "scale",
            "storage": {"root": str(tmp_path / "store")},
            "data": {"train": {"type": "webdataset", "urls": urls}},
            "curation": [{"type": "caption-length", "min_words": 2}, *steps],
            "model": {"type": "open-clip", "config": {"embed_dim": 8, "vision_cfg": {"image_size": 32}, "text_cfg": {}}},
            "parallel": parallel or {"runner": "threads"},
        }
    )


def test_parts_whole_dataset_steps_and_resized_shards(tmp_path):
    urls = _shards(tmp_path / "in", 3, 10, duplicate_of={25: 3})  # part 2 repeats part 0's image
    recipe = _recipe(tmp_path, urls, [{"type": "exact-duplicates"}], shard_size=8)
    catalog = clipforge.get_plugin_manager().catalog
    store = Store(recipe.storage.root)
    summary = curation.curate(recipe, catalog, store, "out", progress=False)
    assert summary.parts == 3 and summary.input == 30 and summary.kept == 29
    rows = {r["key"]: r for r in pq.read_table(store.path("out/manifest.parquet")).to_pylist()}
    assert (rows["k00025"]["step"], rows["k00025"]["reason"], rows["k00025"]["detail"]) == (
        "exact-duplicates",
        "exact duplicate",
        "of k00003",
    )
    assert summary.funnel["exact-duplicates"].model_dump() == {
        "seen": 30,
        "kept": 29,
        "dropped": 1,
        "reasons": {"exact duplicate": 1},
    }
    kept = [s for shard in summary.shards for s in iter_shard(store, shard.path)]
    assert [s["key"] for s in kept] == [f"k{k:05d}" for k in range(30) if k != 25]
    assert {Image.open(io.BytesIO(s["image"])).size for s in kept} == {(32, 32)}  # resized to the model's input
    assert all(rows[s["key"]]["shard"] for s in kept)


def test_a_failed_curation_resumes_without_redoing_finished_parts(tmp_path):
    urls = _shards(tmp_path / "in", 4, 6)
    recipe = _recipe(tmp_path, urls)
    catalog = clipforge.get_plugin_manager().catalog
    reference = curation.curate(recipe, catalog, Store(str(tmp_path / "ref")), "out", progress=False)
    store = Store(recipe.storage.root)
    calls, lost = [], []

    def flaky(fn, jobs):  # the builtin map, with part 2 lost once
        for job in jobs:
            if fn is curation.curate_part:
                calls.append(job.index)
                if job.index == 2 and not lost:
                    lost.append(job.index)
                    raise OSError("worker lost")
            yield fn(job)

    with pytest.raises(OSError, match="worker lost"):
        curation.curate(recipe, catalog, store, "out", mapper=flaky, progress=False)
    calls.clear()
    summary = curation.curate(recipe, catalog, store, "out", mapper=flaky, progress=False)
    assert summary.content_hash == reference.content_hash
    assert calls == [0, 1, 2, 3]  # called, but parts 0 and 1 return what they left on the store
    assert [store.exists(f"out/parts/part-{i:06d}/done.json") for i in range(4)] == [True] * 4


def _peak(tmp_path, name: str, n_shards: int) -> int:
    urls = _shards(tmp_path / name, n_shards, 20)
    recipe = _recipe(tmp_path / name, urls)
    tracemalloc.start()
    curation.curate(recipe, clipforge.get_plugin_manager().catalog, Store(str(tmp_path / name / "store")), "out", progress=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_memory_does_not_grow_with_the_number_of_shards(tmp_path):
    small, large = _peak(tmp_path, "small", 3), _peak(tmp_path, "large", 30)
    assert large <= 1.2 * small, (small, large)


@pytest.mark.slow
@pytest.mark.parametrize("runner", ["threads", "processes", "dask"])
def test_the_flow_maps_parts_over_each_task_runner(tmp_path, tracking, prefect_server, runner):
    from clipforge.flows.curate import curate_flow
    from clipforge.flows.stage import new_run_id, start_run

    urls = _shards(tmp_path / "in", 4, 8, duplicate_of={20: 1})
    recipe = _recipe(tmp_path, urls, [{"type": "exact-duplicates"}], runner=runner, workers=2)
    expected = curation.curate(recipe, clipforge.get_plugin_manager().catalog, Store(str(tmp_path / "ref")), "x", progress=False)
    result = curate_flow(start_run(recipe, new_run_id()).run_id, recipe.storage)
    assert result.content_hash == expected.content_hash and result.kept == 31


@pytest.mark.slow
def test_the_flow_maps_parts_over_a_ray_runtime(tmp_path, tracking, prefect_server, monkeypatch):
    """``parallel: {runner: ray}`` on a local Ray runtime (RAY_ADDRESS would name a cluster's instead)."""
    import ray

    from clipforge.flows.curate import curate_flow, task_runner
    from clipforge.flows.stage import new_run_id, start_run

    urls = _shards(tmp_path / "in", 4, 8, duplicate_of={20: 1})
    recipe = _recipe(tmp_path, urls, [{"type": "exact-duplicates"}], runner="ray", workers=2)
    expected = curation.curate(recipe, clipforge.get_plugin_manager().catalog, Store(str(tmp_path / "ref")), "x", progress=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert task_runner(recipe.parallel).init_kwargs == {"include_dashboard": False, "num_cpus": 2, "namespace": "prefect"}
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert task_runner(recipe.parallel).address == "ray://head:10001"
    monkeypatch.delenv("RAY_ADDRESS")
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        result = curate_flow(start_run(recipe, new_run_id()).run_id, recipe.storage)
        assert ray.is_initialized()  # the flow used the runtime it found, and left it running
    finally:
        ray.shutdown()
    assert result.content_hash == expected.content_hash and result.kept == 31


def test_a_ray_runner_without_ray_installed_is_refused_naming_the_extra(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(clipforge.RecipeError, match=r"parallel.runner: .*pip install 'clipforge\[ray\]'"):
        _recipe(tmp_path, "shards-{0000..0001}.tar", runner="ray")
