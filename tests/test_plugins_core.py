"""The plugin core: built-ins through hooks, entry points, env control, catalogs and their errors."""

from __future__ import annotations

import importlib.metadata
import sys
import types

import pytest
from pydantic import BaseModel, ConfigDict, Field

import clipforge
from clipforge.core import hookspecs
from clipforge.core.catalog import Catalog, Component
from clipforge.core.errors import DuplicateComponentError, RecipeError, UnknownComponentError
from clipforge.core.kinds import KINDS

BUILTIN_COMPONENTS = {
    "encoders": ["open-clip"],
    "losses": ["clip"],
    "datasets": ["synthetic-shapes"],
    "evaluators": ["retrieval", "zero-shot-classification"],
    "curation_steps": ["caption-length"],
}


def test_builtins_register_through_the_hooks(fresh_plugins):
    pm = fresh_plugins()
    for kind, names in BUILTIN_COMPONENTS.items():
        assert set(names) <= set(pm.catalog.names(kind)), kind
    for info in pm.infos.values():
        if info.builtin:
            assert info.ok, info.error
            assert info.hooks and all(h.startswith("register_") for h in info.hooks)
            assert info.components


def test_every_kind_has_a_registration_hook():
    for kind in KINDS:
        assert hasattr(hookspecs, f"register_{kind}")


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    for k, v in attrs.items():
        setattr(mod, k, v)
    return mod


class _EP:
    """An entry point stand-in: what importlib.metadata hands the plugin manager."""

    def __init__(self, name, obj=None, error=None):
        self.name, self._obj, self._error = name, obj, error
        self.dist = types.SimpleNamespace(name=f"dist-{name}")

    def load(self):
        if self._error:
            raise self._error
        return self._obj


def _with_entry_points(monkeypatch, eps):
    real = importlib.metadata.entry_points

    def fake(**kw):
        return eps if kw.get("group") == "clipforge" else real(**kw)

    monkeypatch.setattr(importlib.metadata, "entry_points", fake)


def _loss_plugin(loss_name: str):
    @clipforge.hookimpl
    def register_losses(register):
        register(loss_name, lambda: None, description="a test loss")

    return _module(f"plugin_{loss_name}", register_losses=register_losses)


def test_entry_point_plugins_load_after_the_builtins(monkeypatch, fresh_plugins):
    _with_entry_points(monkeypatch, [_EP("third", _loss_plugin("my-loss"))])
    pm = fresh_plugins()
    assert "my-loss" in pm.catalog.names("losses")
    info = pm.infos["third"]
    assert (info.distribution, info.builtin, info.hooks) == ("dist-third", False, ["register_losses"])
    assert info.components == {"losses": ["my-loss"]}
    assert list(pm.infos)[-1] == "third"


def test_a_broken_plugin_is_reported_and_the_others_still_load(monkeypatch, fresh_plugins):
    @clipforge.hookimpl
    def register_lossess(register):  # a typo: no such hook
        pass

    _with_entry_points(
        monkeypatch,
        [
            _EP("boom", error=ImportError("no module named 'nothing'")),
            _EP("typo", _module("typo", register_lossess=register_lossess)),
            _EP("good", _loss_plugin("fine-loss")),
        ],
    )
    pm = fresh_plugins()
    assert "ImportError" in pm.infos["boom"].error and "nothing" in pm.infos["boom"].error
    assert "register_lossess" in pm.infos["typo"].error
    assert pm.infos["good"].ok and "fine-loss" in pm.catalog.names("losses")


def test_load_and_disable_env_lists(monkeypatch, fresh_plugins):
    _with_entry_points(monkeypatch, [_EP("a", _loss_plugin("loss-a")), _EP("b", _loss_plugin("loss-b"))])
    monkeypatch.setenv("CLIPFORGE_LOAD_PLUGINS", "a")
    assert set(fresh_plugins().catalog.names("losses")) == {"clip", "dcl", "distill", "siglip", "loss-a"}
    clipforge.core.plugins.reset_plugin_manager()
    monkeypatch.delenv("CLIPFORGE_LOAD_PLUGINS")
    monkeypatch.setenv("CLIPFORGE_DISABLE_PLUGINS", "b, clipforge.plugins.losses.contrastive")
    assert set(fresh_plugins().catalog.names("losses")) == {"loss-a"}


def test_a_duplicate_name_names_both_plugins(monkeypatch, fresh_plugins):
    _with_entry_points(monkeypatch, [_EP("copycat", _loss_plugin("clip"))])
    with pytest.raises(DuplicateComponentError) as e:
        _ = fresh_plugins().catalog
    assert "clipforge.plugins.losses.contrastive" in str(e.value) and "copycat" in str(e.value)


def test_unknown_component_lists_the_available_names():
    catalog = clipforge.get_plugin_manager().catalog
    with pytest.raises(UnknownComponentError) as e:
        catalog.create("losses", {"type": "nope"})
    assert "unknown loss 'nope'" in str(e.value) and "clip" in str(e.value)


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    width: int = Field(gt=0)
    name: str = "x"


def _catalog_with(factory, params=None) -> Catalog:
    catalog = Catalog()
    catalog.registrar("losses", "test")("thing", factory, params=params)
    return catalog


def test_params_model_validates_and_reports_paths():
    catalog = _catalog_with(lambda width, name: (width, name), _Params)
    assert catalog.create("losses", {"type": "thing", "width": 3}) == (3, "x")
    with pytest.raises(RecipeError) as e:
        catalog.create("losses", {"type": "thing", "width": 0, "colour": 1})
    assert ("width", "Input should be greater than 0") in e.value.errors
    assert any(p == "colour" and "unknown parameter" in m for p, m in e.value.errors)


def test_params_model_that_ignores_extras_still_refuses_unknown_fields():
    class Lax(BaseModel):
        width: int = 1

    _, errors = Component("losses", "lax", lambda width: width, Lax, "", "t").check({"widht": 2})
    assert errors and errors[0][0] == "widht" and "unknown parameter" in errors[0][1]


def test_factory_without_params_is_checked_against_its_signature():
    catalog = _catalog_with(lambda width=1: width)
    assert catalog.create("losses", {"type": "thing", "width": 5}) == 5
    with pytest.raises(RecipeError, match="unexpected keyword"):
        catalog.create("losses", {"type": "thing", "height": 5})


def test_register_refuses_a_params_that_is_not_a_pydantic_model():
    with pytest.raises(TypeError, match="pydantic model"):
        _catalog_with(lambda: None, params=dict)


def test_public_names_are_importable():
    for name in ("hookimpl", "EncoderBundle", "Sample", "Verdict", "load_recipe", "get_plugin_manager", "Store"):
        assert hasattr(clipforge, name), name
    assert set(clipforge.__all__) <= set(dir(clipforge))


def test_importing_clipforge_does_not_import_torch():
    import subprocess

    code = "import sys, clipforge; clipforge.get_plugin_manager().catalog; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
