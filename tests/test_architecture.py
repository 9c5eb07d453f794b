"""The layers of docs/architecture.md, enforced: a module that imports across them fails here.

Every import counts, also those inside functions (made there to stay light, not to cross a layer).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "clipforge"

#: What each layer may import of clipforge (``clipforge`` alone is the public surface, which is core's).
LAYERS = {
    "core": {"core"},
    "engine": {"core", "engine"},
    "plugins": {"core", "plugins"},
    "registry": {"core", "registry"},
    "flows": {"core", "engine", "registry", "flows"},
    "testing": {"core", "engine", "testing"},
    "cli": {"core", "flows", "registry"},
}
#: Libraries a layer must not import (the engine runs without Prefect, under any launcher).
FORBIDDEN = {
    "core": {"prefect"},
    "engine": {"prefect"},
    "plugins": {"prefect"},
    "registry": {"prefect"},
    "testing": {"prefect"},
}
#: MLflow is the registry's alone; beside it only the resolver, which fetches registered models.
MLFLOW_IN_CORE = {"core/resolver.py"}
#: The one place below the flows that reads Prefect: a retrain's MLflow run is tagged with the id of
#: the flow run that created it (``prefect.runtime``, read only).
PREFECT_RUNTIME_IN_REGISTRY = {"registry/tracking.py"}


def layer_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.name == "cli.py" else "core"


def imports(source: str, module: str) -> list[tuple[int, str]]:
    """Every module ``source`` imports, absolute, with its line (relative imports resolved against ``module``)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")[: -node.level]
                base = ".".join([*parent, base] if base else parent)
            found.append((node.lineno, base))
    return found


def forbidden_library(name: str, layer: str, rel: str) -> bool:
    """Whether module ``rel`` of ``layer`` may not import library module ``name``."""
    library = name.split(".")[0]
    if library == "mlflow":
        return layer != "registry" and rel not in MLFLOW_IN_CORE
    return library in FORBIDDEN.get(layer, set()) and not (name == "prefect.runtime" and rel in PREFECT_RUNTIME_IN_REGISTRY)


def violations(source: str, rel: str) -> list[str]:
    """What module ``rel`` (a path under clipforge/) imports that its layer may not."""
    path = PACKAGE / rel
    layer = layer_of(path)
    module = "clipforge." + rel.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
    problems = []
    for line, name in imports(source, module):
        parts = name.split(".")
        if parts[0] == "clipforge" and len(parts) > 1:
            target = parts[1] if parts[1] in LAYERS or parts[1] == "cli" else "core"
            if target not in LAYERS[layer]:
                problems.append(f"{rel}:{line}: {layer} imports {name}")
        elif forbidden_library(name, layer, rel):
            problems.append(f"{rel}:{line}: {layer} imports {name}")
    return problems


def test_every_module_keeps_to_its_layer():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "__init__.py":
            continue  # the public surface re-exports core
        problems += violations(path.read_text(), rel)
    assert problems == []


@pytest.mark.parametrize(
    ("rel", "source", "expected"),
    [
        ("core/x.py", "from clipforge.engine import curation", "core imports clipforge.engine"),
        ("core/x.py", "def f():\n    import prefect", "core imports prefect"),
        ("engine/x.py", "from clipforge.plugins.evaluators import retrieval", "engine imports clipforge.plugins.evaluators"),
        ("engine/training/x.py", "from ...flows import tracking", "engine imports clipforge.flows"),
        ("engine/x.py", "def f():\n    import mlflow", "engine imports mlflow"),
        ("plugins/losses/x.py", "from clipforge.registry import log_metrics", "plugins imports clipforge.registry"),
        ("registry/x.py", "import clipforge.flows.tracking", "registry imports clipforge.flows.tracking"),
        ("flows/x.py", "import mlflow", "flows imports mlflow"),
        ("flows/x.py", "def f():\n    from mlflow.entities import Metric", "flows imports mlflow.entities"),
        ("cli.py", "def f():\n    import mlflow", "cli imports mlflow"),
        ("core/storage.py", "from mlflow import MlflowClient", "core imports mlflow"),
        ("registry/tracking.py", "from prefect import flow", "registry imports prefect"),
        ("registry/promotion.py", "from prefect.runtime import flow_run", "registry imports prefect.runtime"),
        ("cli.py", "from clipforge.plugins import BUILTINS", "cli imports clipforge.plugins"),
    ],
)
def test_the_check_catches_an_import_across_layers(rel, source, expected):
    assert [p.split(": ", 1)[1] for p in violations(source, rel)] == [expected]


def test_the_check_lets_allowed_imports_pass():
    assert violations("import clipforge\nfrom clipforge.core import components\nimport torch", "plugins/x.py") == []
    assert violations("from clipforge.engine import curation\nimport prefect", "flows/x.py") == []
    assert violations("from clipforge.registry import tracking", "flows/x.py") == []
    assert violations("def f():\n    import mlflow", "core/resolver.py") == []
    assert violations("import mlflow\nfrom mlflow import MlflowClient", "registry/x.py") == []


def module_name(rel: str) -> str:
    """``clipforge.core.recipe`` for ``core/recipe.py``; a package is named by its folder."""
    return ".".join(["clipforge", *rel.removesuffix(".py").split("/")]).removesuffix(".__init__")


def module_imports(source: str, module: str, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``source`` (module ``module``) imports, wherever the import is;
    ``from package import name`` imports the submodule ``package.name`` when there is one."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")[: -node.level]
                base = ".".join([*parent, base] if base else parent)
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return (found & known) - {module}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` (each module to those it imports) as ``[a, b, ..., a]``, or None."""
    done: set[str] = set()
    for root in sorted(graph):
        if root in done:
            continue
        path, on_path = [root], {root}
        stack = [iter(sorted(graph[root]))]
        while stack:
            target = next(stack[-1], None)
            if target is None:
                stack.pop()
                done.add(path[-1])
                on_path.discard(path.pop())
            elif target in on_path:
                return [*path[path.index(target) :], target]
            elif target not in done:
                path.append(target)
                on_path.add(target)
                stack.append(iter(sorted(graph.get(target, ()))))
    return None


def import_graph() -> dict[str, set[str]]:
    sources = {module_name(p.relative_to(PACKAGE).as_posix()): p.read_text() for p in sorted(PACKAGE.rglob("*.py"))}
    return {m: module_imports(src, m, set(sources)) for m, src in sources.items()}


def test_no_module_imports_itself_through_others():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_the_cycle_check_finds_a_circle_and_names_it():
    known = {"clipforge.a", "clipforge.b", "clipforge.b.c", "clipforge.d"}
    graph = {
        "clipforge.a": module_imports("from clipforge.b import c", "clipforge.a", known),
        "clipforge.b": set(),
        "clipforge.b.c": module_imports(
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..d import x", "clipforge.b.c", known
        ),
        "clipforge.d": module_imports("def f():\n    import clipforge.a", "clipforge.d", known),
    }
    assert graph["clipforge.a"] == {"clipforge.b.c"}
    assert find_cycle(graph) == ["clipforge.a", "clipforge.b.c", "clipforge.d", "clipforge.a"]
    graph["clipforge.d"] = {"clipforge.b"}
    assert find_cycle(graph) is None
