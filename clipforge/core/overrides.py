"""``--set dotted.key=value`` overrides of a recipe's raw data, checked against the recipe's fields."""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel

from clipforge.core.errors import ConfigError
from clipforge.core.recipe import (
    COMPONENT_FIELDS,
    CurationPool,
    ParallelConfig,
    PromoteConfig,
    RegistryConfig,
    StorageConfig,
    TrainConfig,
    default_entry,
)
from clipforge.core.recipe_yaml import parse_yaml


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML) to a recipe's raw data."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.epochs=1")
        parts = key.split(".")
        node: Any = data
        for depth, part in enumerate(parts[:-1]):
            node = _child(node, part, ".".join(parts[: depth + 1]), item)
        leaf = parts[-1]
        if isinstance(node, list):
            _child(node, leaf, key, item)
            node[int(leaf)] = _override_value(raw, item)
        elif isinstance(node, dict):
            if leaf not in node and not _is_known_field(data, parts):
                raise ConfigError(f"--set {item!r}: {key!r} is not a field of the recipe")
            node[leaf] = _override_value(raw, item)
        else:
            raise ConfigError(f"--set {item!r}: {'.'.join(parts[:-1])!r} is not a section")
    return data


def _override_value(raw: str, item: str) -> Any:
    try:
        return parse_yaml(raw)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({problem})") from None


def _child(node: Any, part: str, path: str, item: str) -> Any:
    if isinstance(node, dict) and part in node:
        return node[part]
    if isinstance(node, dict) and part in _SECTIONS and path == part:
        return node.setdefault(part, {})
    if isinstance(node, dict) and (default := _component_default(path)) is not None:
        return node.setdefault(part, default)
    if isinstance(node, list) and part.isdigit() and int(part) < len(node):
        return node[int(part)]
    raise ConfigError(f"--set {item!r}: {path!r} is not in the recipe")


# Sections whose fields --set may add although the file leaves them at their defaults.
_SECTIONS: dict[str, type[BaseModel]] = {
    "storage": StorageConfig,
    "train": TrainConfig,
    "registry": RegistryConfig,
    "parallel": ParallelConfig,
    "curation_pool": CurationPool,
}


def _component_default(path: str) -> dict[str, Any] | None:
    """The default entry of a component field of a section (``train.launcher``), for --set to fill in."""
    if path.partition(".")[0] not in _SECTIONS or path not in COMPONENT_FIELDS:
        return None
    return default_entry(path)


#: Where components sit outside the sections: their parameters are checked by the component's
#: params model after the override.
_COMPONENT_ROOTS = {pattern.split(".")[0] for pattern in COMPONENT_FIELDS} - set(_SECTIONS)


def _is_known_field(data: dict[str, Any], parts: list[str]) -> bool:
    if len(parts) >= 3 and _component_default(".".join(parts[:2])) is not None:
        return True  # a component's parameter: its params model checks it
    if len(parts) == 2 and parts[0] in _SECTIONS:
        return parts[1] in {f.alias or name for name, f in _SECTIONS[parts[0]].model_fields.items()}
    if parts[0] == "registry" and len(parts) == 3 and parts[1] == "promote":
        return parts[2] in PromoteConfig.model_fields
    return parts[0] in _COMPONENT_ROOTS
