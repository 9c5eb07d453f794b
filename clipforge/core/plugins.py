"""The plugin manager: built-in plugins first, then the entry points of group ``clipforge``."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import threading
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy

from clipforge.core import hookspecs
from clipforge.core.catalog import Catalog
from clipforge.core.errors import DuplicateComponentError
from clipforge.core.kinds import KINDS

ENTRY_POINT_GROUP = "clipforge"
# Named by string so that the core imports nothing from the rest of the package.
BUILTINS_MODULE = "clipforge.plugins"


@dataclass
class PluginInfo:
    name: str
    distribution: str
    version: str
    builtin: bool
    hooks: list[str] = field(default_factory=list)
    components: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "builtin": self.builtin,
            "status": "ok" if self.ok else "failed",
            "error": self.error,
            "hooks": self.hooks,
            "components": self.components,
        }


def _env_list(name: str) -> set[str] | None:
    value = os.environ.get(name, "").strip()
    return {v.strip() for v in value.split(",") if v.strip()} if value else None


class PluginManager(pluggy.PluginManager):
    """pluggy's manager plus the catalogs the registration hooks fill and a per-plugin report."""

    def __init__(self, *, load_entry_points: bool = True) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self._catalog: Catalog | None = None
        self._lock = threading.Lock()
        disabled = _env_list("CLIPFORGE_DISABLE_PLUGINS") or set()
        for name in importlib.import_module(BUILTINS_MODULE).BUILTINS:
            if name not in disabled:
                self._add(name, lambda name=name: importlib.import_module(name), "clipforge", builtin=True)
        if load_entry_points:
            only = _env_list("CLIPFORGE_LOAD_PLUGINS")
            for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                if ep.name in disabled or (only is not None and ep.name not in only):
                    continue
                self._add(ep.name, ep.load, ep.dist.name if ep.dist else "?", builtin=False)

    def _add(self, name: str, load, distribution: str, *, builtin: bool) -> None:
        try:
            version = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            version = "?"
        info = PluginInfo(name, distribution, version, builtin)
        self.infos[name] = info
        try:
            plugin = load()
            self._register_checked(plugin, name)
        except Exception as e:  # a broken plugin is reported, the others still load
            info.error = f"{type(e).__name__}: {e}"
            return
        info.hooks = sorted(c.name for c in self.get_hookcallers(plugin) or [])

    def _register_checked(self, plugin: ModuleType | object, name: str) -> None:
        """Register ``plugin``, refusing it (unregistered again) if it implements a hook with no spec.

        pluggy's ``check_pending`` semantics, per plugin: an implementation marked
        ``optionalhook=True`` may name a hook that does not exist; any other such name is a typo.
        """
        self.register(plugin, name=name)
        unknown = sorted(
            caller.name
            for caller in self.get_hookcallers(plugin) or []
            if not caller.has_spec() and any(impl.plugin is plugin and not impl.optionalhook for impl in caller.get_hookimpls())
        )
        if unknown:
            self.unregister(plugin)
            raise pluggy.PluginValidationError(plugin, f"implements hooks that do not exist: {', '.join(unknown)}")

    def add_plugin(self, plugin: object, name: str) -> None:
        """Register a plugin object at run time (tests, notebooks); the catalogs are rebuilt."""
        self._register_checked(plugin, name)
        self.infos[name] = PluginInfo(name, "-", "-", False, hooks=sorted(c.name for c in self.get_hookcallers(plugin) or []))
        self._catalog = None

    @property
    def catalog(self) -> Catalog:
        with self._lock:
            if self._catalog is None:
                self._catalog = self._build_catalog()
            return self._catalog

    def _build_catalog(self) -> Catalog:
        catalog = Catalog()
        for info in self.infos.values():
            info.components = {}
        for kind in KINDS.values():
            caller = getattr(self.hook, kind.hook)
            for impl in reversed(caller.get_hookimpls()):  # registration order
                info = self.infos[impl.plugin_name]
                before = set(catalog.names(kind.name))
                try:
                    impl.function(register=catalog.registrar(kind.name, impl.plugin_name))
                except DuplicateComponentError:
                    raise
                except Exception as e:
                    info.error = f"{kind.hook}: {type(e).__name__}: {e}"
                added = sorted(set(catalog.names(kind.name)) - before)
                if added:
                    info.components[kind.name] = added
        return catalog


_manager: PluginManager | None = None
_manager_lock = threading.Lock()


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager, built on first use."""
    global _manager
    with _manager_lock:
        if _manager is None:
            _manager = PluginManager()
        return _manager


def reset_plugin_manager() -> None:
    """Forget the manager so the next use reloads plugins (after changing the env variables)."""
    global _manager
    with _manager_lock:
        _manager = None
