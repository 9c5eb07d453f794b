"""Evaluation: every evaluator of the recipe on its dataset, metrics namespaced ``eval/<evaluator>/<metric>``."""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from typing import Any

from clipforge.core.catalog import Catalog
from clipforge.core.checkpoint import load_open_clip_dir
from clipforge.core.components import EncoderBundle
from clipforge.core.errors import ConfigError, StageError
from clipforge.core.recipe import Recipe
from clipforge.core.storage import Store
from clipforge.engine.trainer import resolve_device


def evaluate(recipe: Recipe, catalog: Catalog, store: Store, model_rel: str, *, device: str = "auto") -> dict[str, float]:
    """Load the model folder ``model_rel`` from the store and run the recipe's evaluators on it."""
    return evaluate_model(recipe, catalog, store, model_rel, device=device).metrics


def evaluate_model(recipe: Recipe, catalog: Catalog, store: Store, model_rel: str, *, device: str = "auto") -> Evaluation:
    """Like :func:`evaluate`, with the evaluators' figure data as well."""
    if not recipe.evaluation:
        return Evaluation({}, {})
    dev = str(resolve_device(device))
    with tempfile.TemporaryDirectory() as tmp:
        bundle = load_open_clip_dir(store.get_dir(model_rel, tmp), device=dev)
    return evaluate_bundle(recipe, catalog, bundle, dev)


@dataclass
class Evaluation:
    """Metrics ``eval/<evaluator>/<metric>``, and per evaluator label the data of its figures."""

    metrics: dict[str, float]
    details: dict[str, dict[str, Any]]


def evaluate_bundle(recipe: Recipe, catalog: Catalog, bundle: EncoderBundle, device: str) -> Evaluation:
    """Run every evaluator of the recipe on ``bundle``; a dataset's embeddings are computed once for all of them.

    An evaluator may leave the data of its figures in a ``details`` dict attribute.
    """
    from clipforge.plugins.evaluators.embeddings import shared_embeddings

    datasets: dict[str, Any] = {}
    metrics: dict[str, float] = {}
    details: dict[str, dict[str, Any]] = {}
    with shared_embeddings():
        for i, ev in enumerate(recipe.evaluation):
            entry = ev.dataset.entry() if ev.dataset is not None else (recipe.data.eval.entry() if recipe.data.eval else None)
            if entry is None:
                raise ConfigError(f"evaluation.{i} ({ev.type}): no dataset: give it a 'dataset:' entry or set data.eval")
            key = json.dumps(entry, sort_keys=True, default=str)
            if key not in datasets:  # one dataset object per entry, shared by the evaluators that use it
                datasets[key] = catalog.create("datasets", entry)
            evaluator = catalog.create("evaluators", ev.entry())
            result = evaluator.evaluate(bundle, datasets[key], device)
            for name, value in result.items():
                value = float(value)
                if not math.isfinite(value):
                    raise StageError(f"evaluation.{i} ({ev.label}): metric {name!r} is {value}")
                metrics[f"eval/{ev.label}/{name}"] = value
            if isinstance(getattr(evaluator, "details", None), dict) and evaluator.details:
                details[ev.label] = evaluator.details
    return Evaluation(metrics, details)
