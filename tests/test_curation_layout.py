"""The curation store layout and what curation tasks carry: shards rolled at their size, the
encoder's input size told by its params, jobs that travel with their recipe validated."""

from __future__ import annotations

import io
import pickle

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydantic import BaseModel

import clipforge
from clipforge.core.catalog import Catalog
from clipforge.core.components import Sample
from clipforge.core.recipe import Recipe
from clipforge.core.storage import Store
from clipforge.engine.curation.layout import MANIFEST, curation_folder
from clipforge.engine.curation.parts import PartJob
from clipforge.engine.curation.plan import input_size
from clipforge.engine.shards import decode, iter_shard, read_index, write_shards


def _item(i: int):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (i % 256, 0, 0)).save(buf, "PNG")
    return decode(Sample(f"k{i:05d}", buf.getvalue(), f"caption {i}"))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(0, 23), per_shard=st.integers(1, 7))
def test_write_shards_rolls_at_the_limit_and_keeps_every_item_in_order(tmp_path_factory, n, per_shard):
    store = Store(str(tmp_path_factory.mktemp("store")))
    shards = write_shards(store, (_item(i) for i in range(n)), lambda s: f"out/s-{s:03d}.tar", per_shard)
    assert [s.path for s in shards] == [f"out/s-{s:03d}.tar" for s in range(len(shards))]
    assert all(s.samples == per_shard for s in shards[:-1]) and all(0 < s.samples <= per_shard for s in shards)
    assert [raw["key"] for s in shards for raw in iter_shard(store, s.path)] == [f"k{i:05d}" for i in range(n)]
    assert all(len(read_index(store, s.path)) == s.samples + 1 for s in shards)


def test_write_shards_leaves_no_open_shard_on_an_error(tmp_path):
    store = Store(str(tmp_path))

    def items():
        yield from (_item(i) for i in range(5))
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        write_shards(store, items(), lambda s: f"out/s-{s}.tar", 3)
    assert store.exists("out/s-0.tar") and not store.exists("out/s-1.tar")


def test_curation_folder_of_a_manifest_uri():
    assert curation_folder(f"s3://bucket/root/curated/abc/{MANIFEST}", "x") == ("s3://bucket/root/curated", "abc")
    with pytest.raises(clipforge.ConfigError, match="x: .* is not a curated manifest"):
        curation_folder("curated/abc/summary.json", "x")


class _SizedParams(BaseModel):
    side: int

    def input_size(self) -> int | None:
        return self.side


def _recipe(model: dict) -> Recipe:
    return Recipe.model_validate({"name": "r", "data": {"train": {"type": "synthetic-shapes"}}, "model": model})


def test_the_input_size_is_what_the_encoder_params_declare():
    catalog = Catalog()
    catalog.registrar("encoders", "p")("sized", lambda side: None, params=_SizedParams)
    catalog.registrar("encoders", "p")("silent", lambda **kw: None)
    assert input_size(_recipe({"type": "sized", "side": 40}), catalog) == 40
    assert input_size(_recipe({"type": "silent", "side": 40}), catalog) is None


def test_open_clip_tells_its_input_size_from_an_inline_config_or_a_name():
    catalog = clipforge.get_plugin_manager().catalog
    inline = {"type": "open-clip", "config": {"embed_dim": 8, "vision_cfg": {"image_size": 32}, "text_cfg": {}}}
    assert input_size(_recipe(inline), catalog) == 32
    assert input_size(_recipe({"type": "open-clip", "arch": "ViT-B-32"}), catalog) == 224


def test_a_job_carries_the_validated_recipe_and_pickles(tiny_recipe):
    recipe = clipforge.load_recipe(tiny_recipe)
    job = PartJob(recipe=recipe, store="/tmp/store", out="out", index=0, entry={"type": "synthetic-shapes"})
    again = pickle.loads(pickle.dumps(job))
    assert again == job and isinstance(again.recipe, Recipe) and again.open()[0] == recipe
