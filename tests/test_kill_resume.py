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
from clipforge.core.storage import Store
from clipforge.core.validation import load_recipe
from clipforge.engine.curation import curate, curation_key
from tests.conftest import kill_at_step

TRAINER = textwrap.dedent(
    """
    import json, sys
    import clipforge
    from clipforge.core.validation import load_recipe
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
    kill_at_step(cmd, env, kill_at)
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


DDP_TRAINER = textwrap.dedent(
    """
    import json, os, sys
    import clipforge
    from clipforge.core.validation import load_recipe
    from clipforge.core.results import Shard
    from clipforge.core.storage import Store
    from clipforge.engine.training import train
    from clipforge.plugins.launchers.torchrun import Torchrun


    class Job:  # what each of the two processes runs
        def __init__(self, recipe, shards, out):
            self.recipe, self.shards, self.out = recipe, shards, out

        def __call__(self):
            with open(f"{self.out.replace('/', '_')}-rank{os.environ['RANK']}.pid", "w") as f:
                f.write(str(os.getpid()))  # for the test to kill this rank
            recipe = load_recipe(self.recipe)
            shards = [Shard.model_validate(s) for s in self.shards]
            report = lambda step, metrics: print(f"step {step}", flush=True)  # rank 0 only
            train(recipe, clipforge.get_plugin_manager().catalog, Store(recipe.storage.root), self.out, shards,
                  on_step=report, progress=False)


    if __name__ == "__main__":
        recipe_path, shards_path, out = sys.argv[1:]
        try:
            Torchrun(2).launch(Job(json.load(open(recipe_path)), json.load(open(shards_path)), out), "cpu")
        except clipforge.StageError as e:
            print(f"failed: {e}", flush=True)
            sys.exit(1)
        print("done", flush=True)
    """
)


@pytest.mark.slow
def test_a_rank_killed_at_a_random_step_resumes_to_the_weights_of_an_uninterrupted_run(tiny_recipe, tmp_path):
    """2 processes x 2 loader workers over uneven shards, a model with dropout; kill -9 rank 1 at a random
    step (CLIPFORGE_KILL_SEEDS seeds: 10 locally, fewer in CI), rerun: bit for bit the same weights."""
    tiny_recipe["model"]["config"] = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16, "patch_dropout": 0.3},
        "text_cfg": {"context_length": 16, "width": 32, "heads": 2, "layers": 1},
    }
    tiny_recipe["loss"] = {"type": "clip", "gather_with_grad": True, "local_loss": True}
    tiny_recipe["train"].update(epochs=2, batch_size=8, checkpoint_every=3, workers=2)
    tiny_recipe["parallel"] = {"shard_size": 45}  # 160 pairs: shards of 45, 45, 45 and 25
    recipe = load_recipe(tiny_recipe)
    store = Store(recipe.storage.root)
    shards = curate(
        recipe, clipforge.get_plugin_manager().catalog, store, f"curated/{curation_key(recipe)}", progress=False
    ).shards
    assert sorted(s.samples for s in shards) == [25, 45, 45, 45]
    (tmp_path / "recipe.json").write_text(json.dumps(tiny_recipe))
    (tmp_path / "shards.json").write_text(json.dumps([s.model_dump() for s in shards]))
    (tmp_path / "trainer.py").write_text(DDP_TRAINER)
    args = [sys.executable, str(tmp_path / "trainer.py"), str(tmp_path / "recipe.json"), str(tmp_path / "shards.json")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    full = subprocess.run([*args, "full/train"], capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert full.returncode == 0, full.stdout[-2000:] + full.stderr[-2000:]
    total = store.read_json("full/train/result.json")["steps"]
    assert total == 2 * (160 // 16) and store.read_json("full/train/result.json")["world_size"] == 2
    want = load_file(store.path("full/train/model/open_clip_model.safetensors"))

    for seed in range(int(os.environ.get("CLIPFORGE_KILL_SEEDS", "10"))):
        kill_at = random.Random(seed).randrange(4, total)  # after the first checkpoint (step 3)
        out = f"cut-{seed}/train"
        proc = subprocess.Popen([*args, out], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=tmp_path)
        for line in proc.stdout:
            if line.strip() == f"step {kill_at}":
                os.kill(int((tmp_path / f"{out.replace('/', '_')}-rank1.pid").read_text()), signal.SIGKILL)
                break
        rest = proc.stdout.read()
        proc.wait(timeout=120)
        assert proc.returncode == 1 and "failed: train: rank 1 of 2 failed" in rest, rest[-2000:]
        assert not store.exists(f"{out}/result.json")
        done = subprocess.run([*args, out], capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        first = int(done.stdout.split("step ")[1].split()[0])  # the first step the rerun trained
        assert store.read_json(f"{out}/result.json")["resumed_from"] == f"{out}/checkpoints/step-{first - 1:08d}"
        got = load_file(store.path(f"{out}/model/open_clip_model.safetensors"))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), (
            f"seed {seed}, killed at step {kill_at}"
        )


def test_a_run_that_died_after_its_final_checkpoint_publishes_the_model_without_another_step(tiny_recipe, tmp_path):
    from clipforge.engine.training import train

    tiny_recipe["train"].update(epochs=1, checkpoint_every=None)
    recipe = load_recipe(tiny_recipe)
    store = Store(recipe.storage.root)
    catalog = clipforge.get_plugin_manager().catalog
    shards = curate(recipe, catalog, store, f"curated/{curation_key(recipe)}", progress=False).shards
    first = train(recipe, catalog, store, "run/train", shards, progress=False)
    want = load_file(store.path("run/train/model/open_clip_model.safetensors"))
    for rel in ("run/train/result.json", "run/train/history.json"):  # as if it died right after the final checkpoint
        os.remove(store.path(rel))
    for f in store.ls("run/train/model"):
        os.remove(store.path(f"run/train/model/{f}"))
    steps = []
    again = train(recipe, catalog, store, "run/train", shards, on_step=lambda s, m: steps.append(s), progress=False)
    assert steps == [] and again.steps == first.steps and again.resumed_from == first.checkpoint
    got = load_file(store.path("run/train/model/open_clip_model.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want)
