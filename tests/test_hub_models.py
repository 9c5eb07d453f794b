"""``hf-hub:`` models from a Hugging Face cache laid out as huggingface_hub lays it out, offline, pinned to their commit;
and ``train.init_from: {model, if_missing}``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import clipforge
from clipforge.core.checkpoint import save_open_clip_dir
from clipforge.core.storage import Store
from clipforge.core.validation import load_recipe
from clipforge.engine.curation import curate, curation_key
from clipforge.engine.training import train
from clipforge.testing import TINY_ENCODER_CONFIG, tiny_encoder_bundle


def fill_hub_cache(home: Path, repo: str, folder: Path, commit: str, ref: str = "main") -> None:
    """What ``hf download`` leaves: blobs by content hash, a snapshot of links to them, refs naming the commit."""
    root = home / "hub" / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = root / "snapshots" / commit / f.name
        if not link.is_symlink():
            link.symlink_to(Path("../../blobs") / blob.name)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / ref).write_text(commit)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    save_open_clip_dir(tiny_encoder_bundle(), tmp_path / "model")
    return home, tmp_path / "model"


@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(commit=st.text("0123456789abcdef", min_size=40, max_size=40), org=st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True))
def test_a_hub_model_resolves_from_the_cache_pinned_to_its_commit(hub, commit, org):
    home, model = hub
    repo = f"{org}/tiny-clip"
    fill_hub_cache(home, repo, model, commit)
    resolved = clipforge.resolve_model(f"hf-hub:{repo}")
    assert resolved.pinned == f"hf-hub:{repo}@{commit}" and resolved.kind == "hub"
    assert resolved.config["embed_dim"] == TINY_ENCODER_CONFIG["embed_dim"]
    assert clipforge.resolve_model(resolved.pinned).folder == resolved.folder
    weights = resolved.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in load_file(model / "open_clip_model.safetensors").items())


def test_a_revision_names_its_commit_and_a_missing_one_lists_what_the_cache_holds(hub):
    home, model = hub
    fill_hub_cache(home, "org/m", model, "a" * 40)
    fill_hub_cache(home, "org/m", model, "b" * 40, ref="v2")
    assert clipforge.resolve_model("hf-hub:org/m@v2").pinned == "hf-hub:org/m@" + "b" * 40
    assert clipforge.resolve_model("hf-hub:org/m").pinned == "hf-hub:org/m@" + "a" * 40
    bundle = clipforge.resolve_model("hf-hub:org/m@v2").load()  # what clipforge evaluate, teachers and scorers load
    assert bundle.arch["embed_dim"] == TINY_ENCODER_CONFIG["embed_dim"]
    with pytest.raises(clipforge.ConfigError, match=r"no revision 'v3'.*refs: main, v2"):
        clipforge.resolve_model("hf-hub:org/m@v3")


def test_a_model_absent_from_an_offline_cache_says_how_to_fill_it(hub):
    with pytest.raises(clipforge.ConfigError, match=r"not in the Hugging Face cache .*HF_HUB_OFFLINE.*hf download org/absent"):
        clipforge.resolve_model("hf-hub:org/absent")
    with pytest.raises(clipforge.ConfigError, match="hf-hub:ORG/NAME"):
        clipforge.resolve_model("hf-hub:no-slash")


def test_a_hub_model_as_the_recipe_model_trains_and_is_pinned(hub, tiny_recipe):
    home, model = hub
    fill_hub_cache(home, "org/tiny", model, "c" * 40)
    tiny_recipe["model"] = {"type": "open-clip", "arch": "hf-hub:org/tiny"}
    tiny_recipe["train"].update(epochs=1, adapter={"type": "lora", "r": 2, "targets": ["attention"]})
    recipe = load_recipe(tiny_recipe)
    store = Store(recipe.storage.root)
    catalog = clipforge.get_plugin_manager().catalog
    shards = curate(recipe, catalog, store, f"curated/{curation_key(recipe)}", progress=False).shards
    result = train(recipe, catalog, store, "hub/train", shards, progress=False)
    assert result.base_model == "hf-hub:org/tiny@" + "c" * 40
    assert json.loads(store.read_bytes("hub/train/adapter/base_model.json"))["base_model"] == result.base_model
    # the hub weights were the start: the text tower's weights outside the adapter are the hub's, bit for bit
    start, exported = (
        load_file(model / "open_clip_model.safetensors"),
        load_file(Path(store.path(result.model)) / "open_clip_model.safetensors"),
    )
    assert torch.equal(start["token_embedding.weight"], exported["token_embedding.weight"])


@pytest.mark.parametrize("if_missing", ["scratch", "pretrained", "fail"])
def test_init_from_a_missing_model_does_what_if_missing_says(tiny_recipe, tmp_path, if_missing):
    tiny_recipe["train"].update(epochs=1, init_from={"model": str(tmp_path / "no-such-model"), "if_missing": if_missing})
    recipe = load_recipe(tiny_recipe)
    store = Store(recipe.storage.root)
    catalog = clipforge.get_plugin_manager().catalog
    shards = curate(recipe, catalog, store, f"curated/{curation_key(recipe)}", progress=False).shards
    if if_missing == "fail":
        with pytest.raises(clipforge.ConfigError, match="train.init_from"):
            train(recipe, catalog, store, "m/train", shards, progress=False)
        return
    result = train(recipe, catalog, store, "m/train", shards, progress=False)
    assert result.init_from is None
    assert store.read_json("m/train/init.json") == {
        "init_from": None,
        "requested": str(tmp_path / "no-such-model"),
        "missing": if_missing,
    }


def test_the_plain_string_init_from_still_fails_when_missing(tiny_recipe, tmp_path):
    tiny_recipe["train"].update(epochs=1, init_from=str(tmp_path / "nothing"))
    recipe = load_recipe(tiny_recipe)
    assert recipe.train.if_missing == "fail"
    store = Store(recipe.storage.root)
    catalog = clipforge.get_plugin_manager().catalog
    shards = curate(recipe, catalog, store, f"curated/{curation_key(recipe)}", progress=False).shards
    with pytest.raises(clipforge.ConfigError, match="train.init_from"):
        train(recipe, catalog, store, "s/train", shards, progress=False)
