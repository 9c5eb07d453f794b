"""A training process killed with SIGKILL at a random step resumes to the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import clipforge
from clipforge.core.recipe import load_recipe
from clipforge.core.storage import Store
from clipforge.engine.curation import curate, curation_key

TRAINER = textwrap.dedent(
    """
    import json, sys
    import clipforge
    from clipforge.core.recipe import load_recipe
    from clipforge.core.results import Shard
    from clipforge.core.storage import Store
    from clipforge.engine.training import train

    recipe_path, shards_path, out = sys.argv[1:]
    recipe = load_recipe(json.load(open(recipe_path)))
    store = Store(recipe.storage.root)
    shards = [Shard.model_validate(s) for s in json.load(open(shards_path))]

    def report(step, metrics):
        print(f"step {step}", flush=True)

    train(recipe, clipforge.get_plugin_manager().catalog, store, out, shards, on_step=report, progress=False)
    print("done", flush=True)
    """
)


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_rerun_gives_identical_weights(tiny_recipe, tmp_path):
    tiny_recipe["train"].update(epochs=2, batch_size=16, checkpoint_every=3)
    tiny_recipe["parallel"] = {"shard_size": 50}
    recipe = load_recipe(tiny_recipe)
    store = Store(recipe.storage.root)
    catalog = clipforge.get_plugin_manager().catalog
    shards = curate(recipe, catalog, store, f"curated/{curation_key(recipe)}", progress=False).shards
    (tmp_path / "recipe.json").write_text(json.dumps(tiny_recipe))
    (tmp_path / "shards.json").write_text(json.dumps([s.model_dump() for s in shards]))
    (tmp_path / "trainer.py").write_text(TRAINER)
    args = [sys.executable, str(tmp_path / "trainer.py"), str(tmp_path / "recipe.json"), str(tmp_path / "shards.json")]
    # both runs in fresh processes with one environment: thread counts set by earlier tests in this
    # process would change the order of float sums, and identical means bit for bit
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    full = subprocess.run([*args, "full/train"], capture_output=True, text=True, env=env, timeout=120)
    assert full.returncode == 0, full.stderr[-2000:]
    total = store.read_json("full/train/result.json")["steps"]
    assert total == 2 * (160 // 16)

    kill_at = random.Random().randrange(4, total)  # after the first checkpoint (step 3)
    cmd = [*args, "cut/train"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:
        if line.strip() == f"step {kill_at}":
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the trainer ended before step {kill_at}"
    assert not store.exists("cut/train/result.json")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = store.read_json("cut/train/result.json")
    first = int(done.stdout.split()[1])  # the first step the rerun trained
    assert resumed["resumed_from"] == f"cut/train/checkpoints/step-{first - 1:08d}" and first - 1 >= 3, (
        kill_at,
        done.stdout[:80],
    )
    a = load_file(store.path("full/train/model/open_clip_model.safetensors"))
    b = load_file(store.path("cut/train/model/open_clip_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"killed at step {kill_at}"
