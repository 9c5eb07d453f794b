"""LoRA adapters (peft) and EMA weights in training: only the adapter trains, the base stays
bit-identical, checkpoints hold the adapter, the export is a plain merged open_clip folder."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import clipforge
from clipforge.core.storage import Store
from clipforge.core.validation import load_recipe
from clipforge.engine.curation import curate, curation_key
from clipforge.engine.training import train
from clipforge.engine.training.adapting import apply_adapter
from clipforge.engine.training.ema import WeightEma
from clipforge.testing import check_adapter, check_component, tiny_encoder_bundle
from tests.conftest import kill_at_step
from tests.test_kill_resume import TRAINER as KILLABLE_TRAINER
from tests.test_torchrun import TRAINER as TORCHRUN_TRAINER
from tests.test_torchrun import VIT


def _catalog():
    return clipforge.get_plugin_manager().catalog


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    r=st.integers(1, 8),
    towers=st.sampled_from([["image", "text"], ["text"], ["image"]]),
    targets=st.sampled_from([["attention"], ["mlp"], ["attention", "mlp"], ["c_fc"]]),
)
def test_lora_passes_the_adapter_check_on_vit_towers(r, towers, targets):
    bundle = tiny_encoder_bundle(VIT)
    merged = check_component("adapters", "lora", {"r": r, "towers": towers, "targets": targets}, bundle=bundle)
    assert not any("lora_" in k for k in merged)


@pytest.mark.parametrize("targets", [["attention"], ["mlp"], ["attention", "mlp"]])
def test_lora_passes_the_adapter_check_on_a_hugging_face_text_tower(targets):
    """BERT's own module names (query/key/value, intermediate/output dense) under the text tower."""
    from tests.test_training_options import _hf_config

    bundle = _catalog().create("encoders", {"type": "open-clip", "config": _hf_config()})
    merged = check_component("adapters", "lora", {"r": 4, "towers": ["text"], "targets": targets}, bundle=bundle)
    assert not any("lora_" in k for k in merged) and any(k.startswith("text.transformer.") for k in merged)


def test_the_adapter_check_catches_an_adapter_that_trains_everything():
    class FullFineTune:
        def apply(self, model):
            pass

        def merge(self, model):
            pass

        def save(self, model, folder):
            (Path(folder) / "x").write_text("x")

    with pytest.raises(clipforge.testing.ConformanceError, match="froze no base weight"):
        check_adapter(FullFineTune())


def test_a_target_that_matches_nothing_lists_what_it_could_match():
    with pytest.raises(clipforge.ConfigError, match=r"'q_proj' matches no module.*visual\.transformer\.resblocks\.N\.attn"):
        check_component("adapters", "lora", {"targets": ["q_proj"]}, bundle=tiny_encoder_bundle(VIT))


@pytest.mark.parametrize("bad, path", [({"r": 0}, "train.adapter.r"), ({"towers": ["audio"]}, "train.adapter.towers.0")])
def test_bad_adapter_fields_are_refused_with_their_path(tiny_recipe, bad, path):
    tiny_recipe["train"]["adapter"] = {"type": "lora", **bad}
    with pytest.raises(clipforge.RecipeError) as e:
        load_recipe(tiny_recipe)
    assert path in [p for p, _ in e.value.errors]


def test_an_adapter_on_a_locked_tower_is_refused():
    bundle = _catalog().create("encoders", {"type": "open-clip", "config": VIT, "lock_image": True})
    with pytest.raises(clipforge.ConfigError, match="image tower is locked"):
        _catalog().create("adapters", {"type": "lora"}).apply(bundle.model)


@settings(max_examples=5, deadline=None)
@given(decay=st.floats(0.5, 0.999), every=st.integers(1, 3), steps=st.integers(1, 7), warmup=st.booleans())
def test_ema_follows_timm_model_ema_v3(decay, every, steps, warmup):
    from clipforge.core.recipe import EmaConfig

    model = torch.nn.Linear(3, 2)
    ema = WeightEma(model, EmaConfig(decay=decay, every=every, warmup=warmup))
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    n = 0
    for step in range(1, steps + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.after_step(step)
        if step % every == 0:
            d = min(decay, (1 + n) / (10 + n)) if warmup else decay
            for name, p in model.named_parameters():
                expected[name] = d * expected[name] + (1 - d) * p.detach()
            n += 1
    assert ema.updates == n
    for name in expected:
        assert torch.allclose(ema.shadow[name], expected[name], atol=1e-6)


def _curated(recipe_data):
    recipe = load_recipe(recipe_data)
    store = Store(recipe.storage.root)
    shards = curate(recipe, _catalog(), store, f"curated/{curation_key(recipe)}", progress=False).shards
    return recipe, store, shards


def _adapted_model(recipe_data, store, checkpoint):
    """The recipe's model rebuilt as training built it (same seed), the adapter applied, the trained weights loaded."""
    recipe = load_recipe(recipe_data)
    torch.manual_seed(recipe.train.seed)
    bundle = _catalog().create("encoders", recipe.model.entry())
    base = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    adapter = _catalog().create("adapters", recipe.train.adapter.entry())
    apply_adapter(adapter, bundle.model, recipe.train.adapter.unlock)
    trained = load_file(store.path(f"{checkpoint}/trainable.safetensors"))
    assert trained.keys() == {n for n, p in bundle.model.named_parameters() if p.requires_grad}
    bundle.model.load_state_dict(trained, strict=False)
    return bundle, base


@pytest.mark.parametrize("r", [3])
def test_lora_training_keeps_the_base_and_exports_a_plain_merged_model(tiny_recipe, r):
    tiny_recipe["model"]["config"] = VIT
    tiny_recipe["train"].update(epochs=1, adapter={"type": "lora", "r": r, "alpha": 2 * r, "unlock": ["logit_scale"]})
    recipe, store, shards = _curated(tiny_recipe)
    result = train(recipe, _catalog(), store, "lora/train", shards, progress=False)
    ckpt = store.ls(result.checkpoint)
    assert "trainable.safetensors" in ckpt and "model.safetensors" not in ckpt

    exported = load_file(store.path("lora/train/model/open_clip_model.safetensors"))
    assert not any("lora_" in k for k in exported)
    bundle, base = _adapted_model(tiny_recipe, store, result.checkpoint)
    assert exported.keys() == base.keys()
    trainable = os.path.getsize(store.path(f"{result.checkpoint}/trainable.safetensors"))
    full = os.path.getsize(store.path("lora/train/model/open_clip_model.safetensors"))
    assert trainable < full / 4  # the adapter, not the model
    # every adapted weight moved by an update of rank <= r; every other weight is the base, bit for bit
    moved = 0
    for k, w in exported.items():
        delta = w - base[k]
        if k == "logit_scale":
            continue
        if torch.equal(w, base[k]):
            continue
        moved += 1
        assert w.ndim == 2 and torch.linalg.matrix_rank(delta.double(), rtol=1e-2) <= r, (
            k
        )  # float32 rounding of the merge: tiny singular values
    assert moved > 0
    # the exported folder loads in plain open_clip and embeds as the adapted model does
    import open_clip

    plain, _, _ = open_clip.create_model_and_transforms(f"local-dir:{store.path('lora/train/model')}", output_dict=True)
    plain.eval(), bundle.model.eval()
    images = torch.randn(3, 3, 32, 32)
    tokens = bundle.tokenizer(["a red circle", "a blue square", "two shapes"])
    with torch.no_grad():
        a, b = plain(images, tokens), bundle.model(images, tokens)
    for key in ("image_features", "text_features"):
        assert torch.allclose(a[key], b[key], atol=1e-5), key
    adapter = store.ls("lora/train/adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "base_model.json"} <= set(adapter)
    assert json.loads(store.read_bytes("lora/train/adapter/adapter_config.json"))["r"] == r


def test_weight_average_alpha_scales_the_merged_update(tiny_recipe):
    tiny_recipe["model"]["config"] = VIT
    tiny_recipe["train"].update(epochs=1, adapter={"type": "lora", "r": 4})
    _, store, shards = _curated(tiny_recipe)
    full = train(load_recipe(tiny_recipe), _catalog(), store, "a1/train", shards, progress=False)
    tiny_recipe["train"]["weight_average"] = {"alpha": 0.25}
    train(load_recipe(tiny_recipe), _catalog(), store, "a025/train", shards, progress=False)
    _, base = _adapted_model({**tiny_recipe, "train": {**tiny_recipe["train"], "weight_average": None}}, store, full.checkpoint)
    w1 = load_file(store.path("a1/train/model/open_clip_model.safetensors"))
    wq = load_file(store.path("a025/train/model/open_clip_model.safetensors"))
    for k in base:
        if base[k].is_floating_point():
            assert torch.allclose(wq[k] - base[k], 0.25 * (w1[k] - base[k]), atol=1e-6), k


def test_ema_is_exported_and_the_raw_weights_stay_in_the_checkpoint(tiny_recipe):
    tiny_recipe["train"].update(epochs=1, ema={"decay": 0.5})
    recipe, store, shards = _curated(tiny_recipe)
    result = train(recipe, _catalog(), store, "ema/train", shards, progress=False)
    raw = load_file(store.path(f"{result.checkpoint}/model.safetensors"))
    averaged = load_file(store.path(f"{result.checkpoint}/ema.safetensors"))
    exported = load_file(store.path("ema/train/model/open_clip_model.safetensors"))
    assert result.ema_decay == 0.5
    assert all(torch.equal(exported[k], averaged[k]) for k in averaged)
    assert any(not torch.equal(raw[k], averaged[k]) for k in averaged)


@pytest.mark.slow
def test_lora_with_ema_killed_at_a_random_step_resumes_to_identical_weights(tiny_recipe, tmp_path):
    tiny_recipe["model"]["config"] = VIT
    tiny_recipe["train"].update(epochs=2, batch_size=16, checkpoint_every=3, adapter={"type": "lora", "r": 4}, ema={"decay": 0.9})
    _recipe, store, shards = _curated(tiny_recipe)
    (tmp_path / "recipe.json").write_text(json.dumps(tiny_recipe))
    (tmp_path / "shards.json").write_text(json.dumps([s.model_dump() for s in shards]))
    (tmp_path / "trainer.py").write_text(KILLABLE_TRAINER)
    args = [sys.executable, str(tmp_path / "trainer.py"), str(tmp_path / "recipe.json"), str(tmp_path / "shards.json")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    full = subprocess.run([*args, "full/train"], capture_output=True, text=True, env=env, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]
    total = store.read_json("full/train/result.json")["steps"]
    kill_at = random.Random().randrange(4, total)
    cmd = [*args, "cut/train"]
    kill_at_step(cmd, env, kill_at)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert store.read_json("cut/train/result.json")["resumed_from"]
    for name in ("model/open_clip_model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(store.path(f"full/train/{name}")), load_file(store.path(f"cut/train/{name}"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (name, kill_at)


@pytest.mark.slow
def test_lora_under_two_torchrun_processes_trains_like_one(tiny_recipe, tmp_path):
    tiny_recipe["model"]["config"] = VIT
    tiny_recipe["loss"] = {"type": "clip", "gather_with_grad": True, "local_loss": True}
    tiny_recipe["train"].update(epochs=1, batch_size=16, lr=1e-3, warmup_steps=0, adapter={"type": "lora", "r": 4})
    _recipe, store, shards = _curated(tiny_recipe)
    (tmp_path / "recipe.json").write_text(json.dumps(tiny_recipe))
    (tmp_path / "shards.json").write_text(json.dumps([s.model_dump() for s in shards]))
    (tmp_path / "trainer.py").write_text(TORCHRUN_TRAINER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(tmp_path / "trainer.py"), str(tmp_path / "recipe.json"), str(tmp_path / "shards.json"), "ddp/train"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    tiny_recipe["train"]["batch_size"] = 32
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(load_recipe(tiny_recipe), _catalog(), store, "one/train", shards, progress=False)
    finally:
        torch.set_num_threads(threads)
    for name in ("model/open_clip_model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(store.path(f"ddp/train/{name}")), load_file(store.path(f"one/train/{name}"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), (name, k, (a[k] - b[k]).abs().max().item())


class BitFit:
    """A third-party adapter (BitFit, Ben Zaken et al. 2022): only the towers' biases train; nothing to merge."""

    def apply(self, model):
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith(".bias"))

    def merge(self, model):
        for p in model.parameters():
            p.requires_grad_(True)

    def save(self, model, folder):
        from safetensors.torch import save_file

        save_file(
            {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}, f"{folder}/biases.safetensors"
        )


class _BitFitPlugin:
    @clipforge.hookimpl
    def register_adapters(self, register):
        register("bitfit", BitFit, description="train the biases only")


def test_a_third_party_adapter_registers_conforms_and_trains(fresh_plugins, tiny_recipe):
    fresh_plugins().add_plugin(_BitFitPlugin(), "bitfit")
    check_component("adapters", "bitfit")
    tiny_recipe["train"].update(epochs=1, adapter={"type": "bitfit"})
    recipe, store, shards = _curated(tiny_recipe)
    result = train(recipe, _catalog(), store, "bitfit/train", shards, progress=False)
    trained = load_file(store.path(f"{result.checkpoint}/trainable.safetensors"))
    assert trained and all(k.endswith(".bias") for k in trained)
    assert store.exists("bitfit/train/adapter/biases.safetensors")
    tiny_recipe["train"]["adapter"] = {"type": "prefix"}
    with pytest.raises(clipforge.RecipeError, match="unknown adapter 'prefix'; available: bitfit, lora"):
        load_recipe(tiny_recipe)
