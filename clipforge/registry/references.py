"""The model references a recipe names, checked against the registry before a run (``--offline`` skips it).

Every string of the recipe that is a model reference of the registry (``models:/NAME@ALIAS``,
``models:/NAME/VERSION``, ``models:/m-<id>``) or an open_clip ``local-dir:`` folder, wherever it
stands (a warm start, a distillation teacher, a curation step's scoring model), must name a model
that exists now; nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from clipforge.core.errors import ConfigError
from clipforge.core.resolver import pin_model
from clipforge.registry.client import mlflow_client


def model_references(data: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """``(field path, reference)`` of every registry or ``local-dir:`` reference in a recipe's data,
    but for the ``model`` of an entry that says what its absence means (``train.init_from:
    {model, if_missing: scratch | pretrained}``): a first run before any champion is no error."""
    if isinstance(data, dict):
        for key, value in data.items():
            if key == "model" and data.get("if_missing") in ("scratch", "pretrained"):
                continue
            yield from model_references(value, f"{path}.{key}" if path else str(key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from model_references(value, f"{path}.{i}")
    elif isinstance(data, str) and data.startswith(("models:/", "local-dir:")):
        yield path, data


def check_model_references(data: dict[str, Any], *, registry: bool = True) -> list[tuple[str, str]]:
    """Each reference of ``data`` that names no model, with its field path: ``local-dir:`` folders always,
    registry references in this process's registry unless ``registry`` is false (``--offline``)."""
    errors = []
    for path, ref in model_references(data):
        if ref.startswith("models:/") and not registry:
            continue
        try:
            _check(ref)
        except ConfigError as e:
            errors.append((path, str(e)))
    return errors


def _check(ref: str) -> None:
    if ref.startswith("local-dir:"):
        folder = Path(ref.removeprefix("local-dir:")).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise ConfigError(f"{ref}: no open_clip_config.json in {folder}")
        return
    pinned = pin_model(ref)  # an alias: the version it names now, or a ConfigError
    target = pinned.removeprefix("models:/")
    client = mlflow_client()
    try:
        if target.startswith("m-"):
            client.get_logged_model(target)
        else:
            name, _, version = target.rpartition("/")
            if not name:
                raise ConfigError(f"{ref}: give models:/NAME@ALIAS or models:/NAME/VERSION")
            client.get_model_version(name, version)
    except ConfigError:
        raise
    except Exception as e:  # MLflow raises RestException or MlflowException, by store
        raise ConfigError(f"{ref}: not in the registry ({e})") from None
