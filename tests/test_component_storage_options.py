"""Components that load models read them through the recipe's ``storage.options``, which the catalog passes.

The store here is a filesystem that opens only with the recipe's endpoint and token (the token as
a ``${ENV_VAR}`` reference, resolved when the model is opened), as an S3 endpoint would.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image
from pydantic import BaseModel

import clipforge
from clipforge.core.checkpoint import save_open_clip_dir
from clipforge.engine.curation.plan import build_steps
from tests.conftest import TINY_CONFIG

ENDPOINT = "http://models.test"
OPTIONS = {"endpoint_url": ENDPOINT, "token": "${CLIPFORGE_TEST_MODEL_TOKEN}"}
MODEL = "guarded://models/scorer"


class GuardedFileSystem(MemoryFileSystem):
    """An in-memory store that refuses to open without its endpoint and token."""

    protocol = "guarded"
    store: ClassVar[dict[str, Any]] = {}  # its own files, not those of fsspec's memory filesystem
    pseudo_dirs: ClassVar[list[str]] = [""]
    cachable = False

    def __init__(self, endpoint_url: str | None = None, token: str | None = None, **kwargs: Any) -> None:
        if endpoint_url != ENDPOINT or token != "s3cret":
            raise PermissionError(f"guarded: endpoint {endpoint_url!r} with token {token!r} refused")
        super().__init__(**kwargs)

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("guarded://"))


@pytest.fixture
def guarded_model(tmp_path, monkeypatch) -> str:
    monkeypatch.setenv("CLIPFORGE_TEST_MODEL_TOKEN", "s3cret")
    fsspec.register_implementation("guarded", GuardedFileSystem, clobber=True)
    GuardedFileSystem.store.clear()
    bundle = clipforge.get_plugin_manager().catalog.create("encoders", {"type": "open-clip", "config": TINY_CONFIG})
    folder = save_open_clip_dir(bundle, tmp_path / "scorer")
    fs = GuardedFileSystem(endpoint_url=ENDPOINT, token="s3cret")
    for f in folder.iterdir():
        fs.pipe_file(f"/models/scorer/{f.name}", f.read_bytes())
    return MODEL


def _samples() -> list[clipforge.Sample]:
    return [clipforge.Sample(str(i), Image.new("RGB", (32, 32), c), f"a {c} square") for i, c in enumerate(["red", "blue"])]


def test_clip_score_opens_its_model_with_the_storage_options_the_host_passes(guarded_model):
    catalog = clipforge.get_plugin_manager().catalog
    entry = {"type": "clip-score", "model": guarded_model, "threshold": -1.0}
    step = catalog.create("curation_steps", entry, OPTIONS)
    assert [v.keep for v in step(_samples())] == [True, True]
    with pytest.raises(PermissionError, match="refused"):
        catalog.create("curation_steps", entry)  # without the recipe's options the store does not open


def test_near_duplicates_and_distill_open_their_models_with_them(guarded_model):
    catalog = clipforge.get_plugin_manager().catalog
    near = catalog.create("curation_steps", {"type": "near-duplicates", "embedding": "model", "model": guarded_model}, OPTIONS)
    assert near.features(_samples()).shape == (2, TINY_CONFIG["embed_dim"])
    distill = catalog.create("losses", {"type": "distill", "teacher": guarded_model}, OPTIONS)
    assert distill.teacher_uri == guarded_model


def test_the_curate_stage_builds_its_steps_with_the_recipe_s_storage_options(guarded_model, tiny_recipe):
    recipe = copy.deepcopy(tiny_recipe)
    recipe["storage"]["options"] = OPTIONS
    recipe["curation"] = [{"type": "clip-score", "model": guarded_model, "threshold": -1.0}]
    catalog = clipforge.get_plugin_manager().catalog
    steps = build_steps(clipforge.load_recipe(recipe, catalog=catalog), catalog)
    ((label, step),) = steps.local
    assert label == "clip-score" and [v.keep for v in step(_samples())] == [True, True]


class _Fields(BaseModel):
    width: int = 1


class _FieldsWithOptions(_Fields):
    storage_options: dict[str, Any] = {}


def _factory(width: int = 1, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"width": width, "storage_options": storage_options}


def _component(factory, params) -> clipforge.Component:
    return clipforge.Component("curation_steps", "probe", factory, params, "", "tests")


def test_only_a_storage_options_keyword_outside_the_recipe_fields_is_filled_by_the_host():
    options = {"endpoint_url": ENDPOINT}
    takes = _component(_factory, _Fields)
    assert takes.takes_storage_options()
    assert takes.create({"width": 2}, options) == {"width": 2, "storage_options": options}
    assert takes.create({"width": 2}) == {"width": 2, "storage_options": None}
    # a recipe field of that name is the recipe's to set (webdataset, balance): the host leaves it alone
    as_field = _component(_factory, _FieldsWithOptions)
    assert not as_field.takes_storage_options()
    assert as_field.create({"storage_options": {"anon": True}}, options)["storage_options"] == {"anon": True}
    # without a params model every factory argument is a recipe field
    assert not _component(_factory, None).takes_storage_options()
    assert not _component(lambda width=1: {"width": width}, _Fields).takes_storage_options()


def test_the_built_ins_that_load_models_take_them_and_the_others_keep_their_own():
    catalog = clipforge.get_plugin_manager().catalog
    takes = {(c.kind, c.name) for c in catalog if c.takes_storage_options()}
    assert {("curation_steps", "clip-score"), ("curation_steps", "near-duplicates"), ("losses", "distill")} <= takes
    assert not {("curation_steps", "balance"), ("datasets", "webdataset")} & takes
