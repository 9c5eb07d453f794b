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
