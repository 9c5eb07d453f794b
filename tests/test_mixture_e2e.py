"""A 1:3 mixture on a 4,096-sample budget, end to end: exactly the budget, the seeded share of each
source, a kill -9 at a random step resumed to identical weights; through the flows, the counts in
MLflow and the model card, an unchanged source reused, replay as one more source, and a source that
curates to nothing stopping the run before training."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap

import mlflow
import pytest
import torch
from safetensors.torch import load_file

import clipforge
from clipforge.core.results import SourceShards
from clipforge.core.storage import Store
from clipforge.core.validation import load_recipe
from clipforge.engine.curation import curate, curation_key
from tests.conftest import kill_at_step

pytestmark = pytest.mark.slow

TRAINER = textwrap.dedent(
    """
    import json, sys
    import clipforge
    from clipforge.core.validation import load_recipe
    from clipforge.core.results import SourceShards
    from clipforge.core.storage import Store
    from clipforge.engine.training import train

    recipe_path, sources_path, out = sys.argv[1:]
    recipe = load_recipe(json.load(open(recipe_path)))
    sources = [SourceShards.model_validate(s) for s in json.load(open(sources_path))]
    report = lambda step, metrics: print(f"step {step}", flush=True)
    train(recipe, clipforge.get_plugin_manager().catalog, Store(recipe.storage.root), out, [], sources=sources,
          on_step=report, progress=False)
    """
)


def mixture(recipe: dict, budget: int, **sources: tuple[float, int]) -> dict:
    """``sources``: name -> (weight, size), each a synthetic-shapes dataset of its own seed."""
    base = recipe["data"]["train"]
    recipe["data"]["train"] = [
        {"source": {**base, "size": size, "seed": 10 + i}, "weight": weight, "name": name}
        for i, (name, (weight, size)) in enumerate(sources.items())
    ]
    del recipe["train"]["epochs"]
    recipe["train"].update(budget={"samples": budget})
    return recipe


def test_a_one_to_three_mixture_trains_its_budget_and_resumes_bit_for_bit_after_kill_9(tiny_recipe, tmp_path):
    recipe_data = mixture(tiny_recipe, 4096, crawl=(1.0, 200), pool=(3.0, 120))
    recipe_data["train"].update(batch_size=64, checkpoint_every=8, warmup_steps=8)
    recipe_data["parallel"] = {"shard_size": 70}  # uneven shards: 70, 70, 60 and 70, 50
    recipe = load_recipe(recipe_data)
    store = Store(recipe.storage.root)
    catalog = clipforge.get_plugin_manager().catalog
    sources = []
    for source, sub in recipe.source_recipes():
        curated = curate(sub, catalog, store, f"curated/{curation_key(sub)}", progress=False)
        sources.append(SourceShards(name=source.label, weight=source.weight, shards=curated.shards))
    (tmp_path / "recipe.json").write_text(json.dumps(recipe_data))
    (tmp_path / "sources.json").write_text(json.dumps([s.model_dump() for s in sources]))
    (tmp_path / "trainer.py").write_text(TRAINER)
    args = [sys.executable, str(tmp_path / "trainer.py"), str(tmp_path / "recipe.json"), str(tmp_path / "sources.json")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    full = subprocess.run([*args, "full/train"], capture_output=True, text=True, env=env, timeout=600)
    assert full.returncode == 0, full.stderr[-2000:]
    result = store.read_json("full/train/result.json")
    assert result["steps"] == 4096 // 64 and result["seen"] == {"crawl": 1024, "pool": 3072}
    history = store.read_json("full/train/history.json")
    lrs = [h["lr"] for h in history]
    # the schedule runs over the budget: warmup, the peak, cosine down to the last step
    assert lrs[7] == pytest.approx(recipe.train.lr) and lrs[-1] < 0.01 * recipe.train.lr and lrs == sorted(lrs[:8]) + lrs[8:]

    kill_at = random.Random().randrange(9, result["steps"])  # after the first checkpoint (step 8)
    cmd = [*args, "cut/train"]
    kill_at_step(cmd, env, kill_at)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = store.read_json("cut/train/result.json")
    assert resumed["resumed_from"] and resumed["seen"] == result["seen"]
    a = load_file(store.path("full/train/model/open_clip_model.safetensors"))
    b = load_file(store.path("cut/train/model/open_clip_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"killed at step {kill_at}"


def test_a_mixture_through_the_flows(tiny_recipe, tracking, prefect_server):
    from clipforge.flows import retrain_flow
    from clipforge.registry import set_champion

    recipe = mixture(tiny_recipe, 256, crawl=(1.0, 64), pool=(3.0, 48))
    first = retrain_flow(recipe, tracking_uri=tracking)
    assert first.train is not None and first.curate is not None and first.register is not None
    assert first.train.seen == {"crawl": 64, "pool": 192} and first.train.steps == 256 // 32
    assert [(s.name, s.kept, s.reused) for s in first.curate.sources] == [("crawl", 64, False), ("pool", 48, False)]
    assert first.curate.input == 112 and len(Store(tiny_recipe["storage"]["root"]).read_json(
        first.curate.manifest.replace("manifest.parquet", "summary.json"))["sources"]) == 2  # fmt: skip
    run = mlflow.get_run(first.mlflow_run_id)
    assert run.data.metrics["train/data/seen/pool"] == 192 and run.data.metrics["train/data/seen_share/crawl"] == 0.25
    assert run.data.metrics["train/data/sources/pool/kept"] == 48
    set_champion(first.register.model_name, first.register.version, reason="the first model of the mixture")

    # next week: the crawl changes, the pool does not (reused); the champion's data is replayed as a third source
    recipe["data"]["train"][0]["source"]["seed"] = 99
    recipe["data"]["replay"] = {"from": "champion", "fraction": 0.5, "seed": 0}
    second = retrain_flow(recipe, tracking_uri=tracking)
    assert second.curate is not None and second.train is not None
    assert [(s.name, s.reused) for s in second.curate.sources] == [("crawl", False), ("pool", True)]
    assert second.curate.replay is not None and second.curate.replay.pairs > 0
    # half the samples replayed, the other half 1:3 as before
    assert second.train.seen == {"crawl": 32, "pool": 96, "replay": 128}


def test_a_source_that_curates_to_nothing_stops_the_run_before_training(tiny_recipe, tracking, prefect_server):
    from clipforge.core.errors import StageError
    from clipforge.flows import retrain_flow

    recipe = mixture(tiny_recipe, 256, crawl=(1.0, 64), tiny=(1.0, 32))
    recipe["data"]["train"][1]["source"]["image_size"] = 16
    recipe["curation"] = [{"type": "image-size", "min_side": 24}]
    with pytest.raises(StageError, match=r"the source 'tiny' \(synthetic-shapes\) kept none of its 32 pairs"):
        retrain_flow(recipe, tracking_uri=tracking, stages=["curate", "train"])
