"""Discovery edge cases: pluggy's check_pending semantics per plugin, and failed plugins in `clipforge plugins`."""

from __future__ import annotations

import json

import pluggy
import pytest

import clipforge
from clipforge.cli import main
from tests.test_plugins_core import _EP, _loss_plugin, _module, _with_entry_points


def test_an_optional_hook_that_does_not_exist_is_allowed(monkeypatch, fresh_plugins):
    # A plugin written for a newer clipforge marks the hooks an older one may lack as optional.
    @clipforge.hookimpl(optionalhook=True)
    def after_the_future(context):
        pass

    @clipforge.hookimpl
    def register_losses(register):
        register("forward-compatible", lambda: None)

    plugin = _module("forward", after_the_future=after_the_future, register_losses=register_losses)
    _with_entry_points(monkeypatch, [_EP("forward", plugin)])
    pm = fresh_plugins()
    assert pm.infos["forward"].ok, pm.infos["forward"].error
    assert "forward-compatible" in pm.catalog.names("losses")


def test_a_plugin_with_an_unknown_hook_is_not_half_registered(monkeypatch, fresh_plugins):
    @clipforge.hookimpl
    def after_evaluations(context, metrics):  # a typo of after_evaluation
        pass

    @clipforge.hookimpl
    def register_losses(register):
        register("never-seen", lambda: None)

    plugin = _module("typo", after_evaluations=after_evaluations, register_losses=register_losses)
    _with_entry_points(monkeypatch, [_EP("typo", plugin)])
    pm = fresh_plugins()
    assert "after_evaluations" in pm.infos["typo"].error and "register_losses" not in pm.infos["typo"].error
    assert not pm.is_registered(plugin)
    assert "never-seen" not in pm.catalog.names("losses")  # its valid hooks do not run either


def test_a_hook_implementation_with_a_wrong_argument_is_reported(monkeypatch, fresh_plugins):
    @clipforge.hookimpl
    def after_train_step(context, step, metrics, optimizer):  # no such argument
        pass

    _with_entry_points(monkeypatch, [_EP("wrongarg", _module("wrongarg", after_train_step=after_train_step))])
    error = fresh_plugins().infos["wrongarg"].error
    assert "PluginValidationError" in error and "optimizer" in error


def test_add_plugin_refuses_an_unknown_hook(fresh_plugins):
    class Typo:
        @clipforge.hookimpl
        def before_stages(self, stage, context):
            pass

    pm = fresh_plugins()
    with pytest.raises(pluggy.PluginValidationError, match="before_stages"):
        pm.add_plugin(Typo(), "typo")
    assert "typo" not in pm.infos


def test_clipforge_plugins_shows_a_failed_plugin_as_failed(monkeypatch, fresh_plugins, capsys):
    _with_entry_points(
        monkeypatch,
        [_EP("broken", error=ModuleNotFoundError("No module named 'torchaudio'")), _EP("fine", _loss_plugin("fine-loss"))],
    )
    fresh_plugins()
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    broken = next(line for line in lines if line.startswith("broken"))
    assert "(dist-broken" in broken and "failed" in broken and "No module named 'torchaudio'" in broken
    assert next(line for line in lines if line.startswith("fine")).endswith("ok")
    (losses,) = [line for line in lines if line.startswith("losses: ")]
    assert "fine-loss" in losses.split(": ", 1)[1].split(", ")

    assert main(["plugins", "--json"]) == 0
    infos = {i["name"]: i for i in json.loads(capsys.readouterr().out)}
    assert infos["broken"]["status"] == "failed" and "torchaudio" in infos["broken"]["error"]
    assert infos["broken"]["hooks"] == [] and infos["broken"]["components"] == {}
    assert infos["fine"] | {"version": "?"} == {
        "name": "fine", "distribution": "dist-fine", "version": "?", "builtin": False, "status": "ok",
        "error": None, "hooks": ["register_losses"], "components": {"losses": ["fine-loss"]},
    }  # fmt: skip
