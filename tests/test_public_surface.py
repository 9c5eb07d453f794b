"""``clipforge`` is the public surface: what it exports is exactly what the docs name, and plugins use nothing else.

In the style of httpx's ``tests/test_exported_members.py``: ``__all__`` lists the module's public
names, sorted; every ``clipforge.X`` the hook docstrings and the docs name is among them; every
exported name is documented in docs/plugins.md. The built-in plugins and the example plugin are
held to what a third party may import: ``clipforge`` itself and modules of their own package.
"""

from __future__ import annotations

import ast
import inspect
import pkgutil
import re
import types
from pathlib import Path

import clipforge
from clipforge.core import hookspecs

ROOT = Path(__file__).resolve().parents[1]
PLUGINS_DOC = ROOT / "docs" / "plugins.md"
EXAMPLE_SRC = ROOT / "examples" / "clipforge-plugin-example" / "src"
SUBPACKAGES = {m.name for m in pkgutil.iter_modules(clipforge.__path__)}
INCLUDED_PRIVATE = {"__version__"}


def test_all_lists_every_public_name_sorted():
    public = [
        name
        for name, value in vars(clipforge).items()
        if (not name.startswith("_") or name in INCLUDED_PRIVATE) and not isinstance(value, types.ModuleType)
    ]
    # the order is ruff's (RUF022: isort-style); here, that every public name is listed once
    assert sorted(clipforge.__all__) == sorted(public) and len(set(clipforge.__all__)) == len(clipforge.__all__)


def test_every_exported_name_is_importable():
    namespace: dict[str, object] = {}
    exec("from clipforge import *", namespace)
    assert sorted(set(namespace) - {"__builtins__"}) == sorted(clipforge.__all__)


# -- the names the docs use ----------------------------------------------------------------

# `clipforge.X` not followed by a further dotted part (`clipforge.core.x`, an MLflow tag `clipforge.run_id.y`)
_NAME = re.compile(r"(?<![\w/])(@?)~?clipforge\.([A-Za-z_]\w*)(?!\w|\.\w)(\(?)")


def named(text: str, *, every: bool) -> set[str]:
    """The clipforge names ``text`` uses as API. With ``every`` false (prose that also names MLflow
    tags and events, ``clipforge.run_id``), only classes, decorators and calls count."""
    found = set()
    for decorator, name, call in _NAME.findall(text):
        if name in SUBPACKAGES:
            continue
        if every or name[0].isupper() or decorator or call:
            found.add(name)
    return found


def _docstrings(module: types.ModuleType) -> str:
    tree = ast.parse(inspect.getsource(module))
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef)))]
    return "\n".join(ast.get_docstring(n) or "" for n in nodes)


def documented_names() -> dict[str, set[str]]:
    sources = {"clipforge/core/hookspecs.py": named(_docstrings(hookspecs), every=True)}
    sources["docs/plugins.md"] = named(PLUGINS_DOC.read_text(), every=True)
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        if path != PLUGINS_DOC:
            sources[str(path.relative_to(ROOT))] = named(path.read_text(), every=False)
    return sources


def test_every_name_the_docs_use_is_exported():
    missing = {src: sorted(names - set(clipforge.__all__)) for src, names in documented_names().items()}
    assert {src: names for src, names in missing.items() if names} == {}


def test_every_exported_name_is_documented_in_the_plugin_guide():
    text = PLUGINS_DOC.read_text()
    undocumented = [
        name
        for name in clipforge.__all__
        if name not in INCLUDED_PRIVATE and not re.search(rf"(`|clipforge\.){re.escape(name)}\b", text)
    ]
    assert undocumented == []


def test_the_name_check_reads_api_names_only():
    prose = "tag `clipforge.run_id`, `clipforge.Pool`, `@clipforge.hookimpl`, `clipforge.resolve_model(ref)`, `clipforge.core.x`"
    assert named(prose, every=False) == {"Pool", "hookimpl", "resolve_model"}
    assert named(prose, every=True) == {"Pool", "hookimpl", "resolve_model", "run_id"}
    assert named(":class:`~clipforge.Launcher`; :mod:`clipforge.testing`.", every=True) == {"Launcher"}


# -- plugins import the public surface only --------------------------------------------------


def foreign_imports(source: str, own: str) -> list[str]:
    """Imports of clipforge in ``source`` other than ``clipforge`` itself, its exported names and the
    modules of the plugin's own package ``own``; function-local and TYPE_CHECKING imports included."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "clipforge":
                problems += [f"from clipforge import {a.name}" for a in node.names if a.name not in clipforge.__all__]
                continue
            modules = [node.module]
        else:
            continue  # a relative import stays inside the plugin's package
        for module in modules:
            if module.split(".")[0] == "clipforge" and module != "clipforge" and not f"{module}.".startswith(f"{own}."):
                problems.append(f"import {module}")
    return problems


def _plugin_sources() -> dict[str, tuple[str, str]]:
    """Each plugin module's path, its source and its own package."""
    sources = {}
    for path in sorted((ROOT / "clipforge" / "plugins").rglob("*.py")):
        sources[str(path.relative_to(ROOT))] = (path.read_text(), "clipforge.plugins")
    for path in sorted(EXAMPLE_SRC.rglob("*.py")):
        package = path.relative_to(EXAMPLE_SRC).parts[0]
        sources[str(path.relative_to(ROOT))] = (path.read_text(), package)
    return sources


def test_plugins_import_only_the_public_surface_and_their_own_package():
    sources = _plugin_sources()
    assert any(p.startswith("examples/") for p in sources) and any(p.startswith("clipforge/plugins/") for p in sources)
    problems = {path: foreign_imports(source, own) for path, (source, own) in sources.items()}
    assert {path: found for path, found in problems.items() if found} == {}


def test_the_import_check_catches_internal_imports():
    source = (
        "import clipforge\n"
        "from clipforge import Sample, Verdict\n"
        "from clipforge.plugins.curation.embedding import thumbnails\n"
        "from . import sibling\n"
        "from clipforge.core.components import Pool\n"
        "import clipforge.core.storage\n"
        "from clipforge import core\n"
        "def f():\n"
        "    from clipforge.engine import data\n"
    )
    assert foreign_imports(source, "clipforge.plugins") == [
        "import clipforge.core.components",
        "import clipforge.core.storage",
        "from clipforge import core",
        "import clipforge.engine",
    ]
    # another plugin's package is not "clipforge" and is not checked; the example's own package passes
    assert foreign_imports("from clipforge_example.params import DclParams\n", "clipforge_example") == []
    assert foreign_imports(source, "clipforge_example")[0] == "import clipforge.plugins.curation.embedding"
