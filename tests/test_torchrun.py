"""The training engine under ``torchrun`` (2 CPU processes, gloo) against one process with the global batch."""

from __future__ import annotations

import json
import os
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
from clipforge.engine.training import train

VIT = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "width": 32, "heads": 2, "layers": 1},
}

TRAINER = textwrap.dedent(
    """
    import json, sys
    import torch
    import clipforge
    from clipforge.core.validation import load_recipe
    from clipforge.core.results import Shard
    from clipforge.core.storage import Store
    from clipforge.engine.training import train

    torch.set_num_threads(1)
    recipe = load_recipe(json.load(open(sys.argv[1])))
    train(recipe, clipforge.get_plugin_manager().catalog, Store(recipe.storage.root), sys.argv[3],
          [Shard.model_validate(s) for s in json.load(open(sys.argv[2]))], progress=False)
    """
)


@pytest.mark.slow
def test_two_torchrun_processes_train_like_one_process_with_the_global_batch(tiny_recipe, tmp_path):
    """Tolerance: after 4 AdamW steps every weight within 1e-4 (abs) + 1e-3 (rel) of the 1-process run."""
    tiny_recipe["model"]["config"] = VIT
    tiny_recipe["loss"] = {"type": "clip", "gather_with_grad": True, "local_loss": True}
    tiny_recipe["train"].update(epochs=1, batch_size=16, checkpoint_every=2, lr=1e-3, warmup_steps=0)
    (tmp_path / "recipe.json").write_text(json.dumps(tiny_recipe))
    recipe = load_recipe(tiny_recipe)
    store = Store(recipe.storage.root)
    catalog = clipforge.get_plugin_manager().catalog
    shards = curate(recipe, catalog, store, f"curated/{curation_key(recipe)}", progress=False).shards
    (tmp_path / "shards.json").write_text(json.dumps([s.model_dump() for s in shards]))
    (tmp_path / "trainer.py").write_text(TRAINER)

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(tmp_path / "trainer.py"), str(tmp_path / "recipe.json"), str(tmp_path / "shards.json"), "ddp/train"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = store.read_json("ddp/train/result.json")
    assert ddp["world_size"] == 2 and ddp["steps"] == 160 // 32

    tiny_recipe["train"]["batch_size"] = 32  # one process, the global batch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train(load_recipe(tiny_recipe), catalog, store, "one/train", shards, progress=False)
    finally:
        torch.set_num_threads(threads)  # the tests after this one run with the machine's threads
    assert single.steps == ddp["steps"]
    a = load_file(store.path("ddp/train/model/open_clip_model.safetensors"))
    b = load_file(store.path("one/train/model/open_clip_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-3), (k, (a[k] - b[k]).abs().max().item())
    assert not torch.allclose(
        a["text_projection"], load_file(store.path("ddp/train/checkpoints/step-00000002/model.safetensors"))["text_projection"]
    )
