"""Evaluation: every evaluator of the recipe on its dataset, metrics namespaced ``eval/<evaluator>/<metric>``."""

from __future__ import annotations

import json
import math
import tempfile
from typing import Any

from clipforge.core.catalog import Catalog
from clipforge.core.checkpoint import load_open_clip_dir
from clipforge.core.errors import ConfigError, StageError
from clipforge.core.recipe import Recipe
from clipforge.core.storage import Store
from clipforge.engine.trainer import resolve_device


def evaluate(recipe: Recipe, catalog: Catalog, store: Store, model_rel: str, *, device: str = "auto") -> dict[str, float]:
    """Load the model folder ``model_rel`` from the store and run the recipe's evaluators on it."""
    if not recipe.evaluation:
        return {}
    dev = str(resolve_device(device))
    with tempfile.TemporaryDirectory() as tmp:
        bundle = load_open_clip_dir(store.get_dir(model_rel, tmp), device=dev)
    datasets: dict[str, Any] = {}
    metrics: dict[str, float] = {}
    for i, ev in enumerate(recipe.evaluation):
        entry = ev.dataset.entry() if ev.dataset is not None else (recipe.data.eval.entry() if recipe.data.eval else None)
        if entry is None:
            raise ConfigError(f"evaluation.{i} ({ev.type}): no dataset: give it a 'dataset:' entry or set data.eval")
        key = json.dumps(entry, sort_keys=True, default=str)
        if key not in datasets:  # one dataset object per entry, shared by the evaluators that use it
            datasets[key] = catalog.create("datasets", entry)
        evaluator = catalog.create("evaluators", ev.entry())
        result = evaluator.evaluate(bundle, datasets[key], dev)
        for name, value in result.items():
            value = float(value)
            if not math.isfinite(value):
                raise StageError(f"evaluation.{i} ({ev.label}): metric {name!r} is {value}")
            metrics[f"eval/{ev.label}/{name}"] = value
    return metrics
