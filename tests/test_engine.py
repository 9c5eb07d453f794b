"""The stage engines without Prefect or MLflow: curation, training, resume, export, evaluation."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import clipforge
from clipforge.core.errors import StageError
from clipforge.core.storage import Store
from clipforge.core.validation import load_recipe
from clipforge.engine.curation import curate, curation_key
from clipforge.engine.evaluation import evaluate
from clipforge.engine.shards import iter_shard
from clipforge.engine.training import train


def _png(color=(200, 30, 30), size=(24, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


BAD_SAMPLES = {
    "ok-a": (_png(), "a red square"),
    "ok-b": (Image.new("RGB", (20, 20), "blue"), ["a blue square", "blue box"]),
    "empty-caption": (_png(), "   "),
    "no-caption": (_png(), None),
    "not-utf8": (_png(), b"\xff\xfe red"),
    "huge-caption": (_png(), "red " * 300_000),
    "zero-bytes": (b"", "a red square"),
    "not-an-image": (b"<html>hello</html>", "a red square"),
    "truncated": (_png()[:40], "a red square"),
    "../escape": (_png(), "a red square"),
    "one-word": (_png(), "red"),
}


class _BadData:
    def __init__(self):
        self.samples = [clipforge.Sample(k, img, cap) for k, (img, cap) in BAD_SAMPLES.items()]
        self.samples.append(clipforge.Sample("ok-a", _png(), "a duplicate key"))

    def __iter__(self):
        return iter(self.samples)


class _BadDataPlugin:
    @clipforge.hookimpl
    def register_datasets(self, register):
        register("bad-data", _BadData)


def test_curation_drops_bad_input_with_reasons_and_keeps_the_rest(tmp_path, fresh_plugins):
    pm = fresh_plugins()
    pm.add_plugin(_BadDataPlugin(), "bad-data-plugin")
    recipe = load_recipe(
        {
            "name": "bad",
            "data": {"train": {"type": "bad-data"}},
            "curation": [{"type": "caption-length", "min_words": 2}],
            "model": {"type": "open-clip", "arch": "RN50"},
        },
        catalog=pm.catalog,
    )
    store = Store(str(tmp_path))
    out = f"curated/{curation_key(recipe)}"
    summary = curate(recipe, pm.catalog, store, out, progress=False)
    manifest = pq.read_table(store.path(summary.manifest)).to_pylist()
    by_key = {}
    for row in manifest:
        by_key.setdefault(row["key"], row)
    assert summary.input == len(BAD_SAMPLES) + 1 == len(manifest)
    assert summary.kept == 2
    reasons = {k: (r["step"], r["reason"]) for k, r in by_key.items() if not r["kept"]}
    assert reasons["empty-caption"] == ("decode", "empty caption")
    assert reasons["no-caption"] == ("decode", "missing caption")
    assert reasons["not-utf8"] == ("decode", "caption is not UTF-8")
    assert reasons["huge-caption"][1].startswith("caption longer than")
    assert reasons["zero-bytes"] == ("decode", "empty image file")
    assert reasons["not-an-image"][1].startswith("undecodable image")
    assert reasons["truncated"][1].startswith("undecodable image")
    assert reasons["../escape"] == ("decode", "invalid key")
    assert reasons["one-word"][0] == "caption-length"
    assert [(r["key"], r["kept"]) for r in manifest if r["reason"] == "duplicate key"] == [("ok-a", False)]
    funnel = summary.funnel
    assert funnel["decode"].dropped == 9 and funnel["caption-length"].dropped == 1
    kept = list(iter_shard(store, summary.shards[0].path))
    assert [s["key"] for s in kept] == ["ok-a", "ok-b"]
    assert kept[1]["caption"] == ["a blue square", "blue box"]
    assert Image.open(io.BytesIO(kept[0]["image"])).size == (24, 24)


def _curated(tiny_recipe, tmp_path, **train):
    tiny_recipe["train"].update(train)
    tiny_recipe["parallel"] = {"shard_size": 50}
    recipe = load_recipe(tiny_recipe)
    catalog = clipforge.get_plugin_manager().catalog
    store = Store(str(tmp_path / "store"))
    summary = curate(recipe, catalog, store, f"curated/{curation_key(recipe)}", progress=False)
    return recipe, catalog, store, summary


def test_a_dataset_smaller_than_a_batch_is_an_error(tiny_recipe, tmp_path):
    tiny_recipe["data"]["train"]["size"] = 20
    recipe, catalog, store, summary = _curated(tiny_recipe, tmp_path)
    with pytest.raises(StageError, match="no full batch of train.batch_size=32"):
        train(recipe, catalog, store, "run/train", summary.shards, progress=False)


def test_a_nan_loss_stops_the_run_naming_the_step(tiny_recipe, tmp_path):
    recipe, catalog, store, summary = _curated(tiny_recipe, tmp_path, lr=1e30, warmup_steps=0)
    with pytest.raises(StageError, match=r"the loss is (nan|inf|-inf) at step \d+"):
        train(recipe, catalog, store, "run/train", summary.shards, progress=False)
    assert not store.exists("run/train/result.json")


def _weights(store, out):
    return load_file(store.path(f"{out}/model/open_clip_model.safetensors"))


def test_an_interrupted_training_resumes_to_identical_weights(tiny_recipe, tmp_path):
    recipe, catalog, store, summary = _curated(tiny_recipe, tmp_path, checkpoint_every=3)
    full = train(recipe, catalog, store, "full/train", summary.shards, progress=False)

    class Crash(Exception):
        pass

    def crash_at_7(step, metrics):
        if step == 7:
            raise Crash

    with pytest.raises(Crash):
        train(recipe, catalog, store, "cut/train", summary.shards, on_step=crash_at_7, progress=False)
    assert store.ls("cut/train/checkpoints") == ["step-00000003", "step-00000006"]
    resumed = train(recipe, catalog, store, "cut/train", summary.shards, progress=False)
    assert resumed.resumed_from == "cut/train/checkpoints/step-00000006"
    assert resumed.steps == full.steps == 2 * (160 // 32)
    a, b = _weights(store, "full/train"), _weights(store, "cut/train")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a finished training is not redone
    assert train(recipe, catalog, store, "full/train", summary.shards, progress=False) == full


def test_the_exported_model_loads_in_plain_open_clip_with_the_same_embeddings(tiny_recipe, tmp_path):
    import open_clip

    recipe, catalog, store, summary = _curated(tiny_recipe, tmp_path, epochs=1)
    result = train(recipe, catalog, store, "run/train", summary.shards, progress=False)
    folder = store.path(result.model)
    config = json.loads(Path(folder, "open_clip_config.json").read_text())
    assert config["model_cfg"]["embed_dim"] == 32 and config["preprocess_cfg"]["size"] in (32, [32, 32])
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    model.eval()
    from clipforge.core.checkpoint import load_open_clip_dir

    ours = load_open_clip_dir(folder)
    image = Image.new("RGB", (32, 32), "red")
    with torch.no_grad():
        for m, tok, pre in ((model, tokenizer, preprocess), (ours.model, ours.tokenizer, ours.preprocess_val)):
            emb = (m.encode_image(pre(image)[None]), m.encode_text(tok(["a red circle"])))
            if m is model:
                expected = emb
        assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(expected, emb))


def test_evaluation_namespaces_metrics_by_evaluator(tiny_recipe, tmp_path):
    recipe, catalog, store, summary = _curated(tiny_recipe, tmp_path, epochs=1)
    result = train(recipe, catalog, store, "run/train", summary.shards, progress=False)
    metrics = evaluate(recipe, catalog, store.uri(result.model), device="cpu").metrics
    assert {
        "eval/zero-shot-classification/acc1",
        "eval/retrieval/mean_recall@1",
        "eval/retrieval/image_retrieval_recall@5",
    } <= set(metrics)
    assert all(0.0 <= v <= 1.0 and np.isfinite(v) for v in metrics.values())


def test_curation_catches_every_defect_of_the_synthetic_crawl(tiny_recipe, tmp_path):
    tiny_recipe["data"]["train"].update(size=300, defects=0.2)
    recipe = load_recipe(tiny_recipe)
    catalog = clipforge.get_plugin_manager().catalog
    summary = curate(recipe, catalog, Store(str(tmp_path)), "curated/x", progress=False)
    defects = [s.meta["defect"] for s in catalog.create("datasets", recipe.data.train.entry()) if "defect" in s.meta]
    funnel = summary.funnel
    assert summary.kept == 300 - len(defects)
    assert funnel["decode"].dropped == sum(d != "one-word caption" for d in defects)
    assert funnel["caption-length"].dropped == defects.count("one-word caption")
    assert funnel["decode"].reasons["empty caption"] == defects.count("empty caption")
