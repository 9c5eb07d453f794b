"""Reading recipe files: YAML as plain data, a key given twice refused, the recipes shipped in the package."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from clipforge.core.errors import ConfigError, RecipeError


def builtin_recipe(name: str) -> Path:
    """Path of a recipe shipped inside the package (``shapes`` is the embedded default)."""
    path = Path(str(resources.files("clipforge") / "recipes" / f"{name}.yaml"))
    if not path.is_file():
        raise ConfigError(f"no built-in recipe {name!r}")
    return path


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int) -> None:
        super().__init__(f"line {line}: key {key!r} is given twice (first on line {first})")


class _Loader(yaml.SafeLoader):
    """YAML's safe loader (no tag builds an object), refusing a key given twice in one mapping:
    PyYAML would keep the last silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults`: keys given after it override the merged ones on purpose
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(key, line, seen[key])
                seen[key] = line
            except TypeError:
                continue  # an unhashable key: the base class refuses it with its own message
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    """YAML text as plain data (:class:`_Loader`); raises ``yaml.YAMLError``."""
    return yaml.load(text, Loader=_Loader)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not a recipe file")
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        kind = "not text" if b"\0" in raw else "not UTF-8"
        raise ConfigError(f"{path}: {kind} (byte {e.start}: {raw[e.start : e.start + 1]!r}); a recipe is UTF-8 YAML") from None
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise RecipeError([("", f"the recipe must be a mapping, got {type(data).__name__}")], source=str(path))
    return data
