"""Evaluation: every evaluator of the recipe on its dataset, metrics namespaced ``eval/<evaluator>/<metric>``."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from clipforge.core.catalog import Catalog
from clipforge.core.components import ChoosesHyperparameters, EncoderBundle, ReportsDetails
from clipforge.core.embeddings import shared_embeddings
from clipforge.core.errors import ConfigError, StageError
from clipforge.core.recipe import Recipe
from clipforge.core.resolver import resolve_model
from clipforge.engine.training.runtime import resolve_device

#: Called before each evaluator runs with (its position from 1, how many there are, its label).
EvaluatorCallback = Callable[[int, int, str], None]


@dataclass
class Evaluation:
    """Metrics ``eval/<evaluator>/<metric>``, per evaluator label the data of its figures, and the
    settings evaluators chose (``eval/<evaluator>/<name>``, :class:`~clipforge.ChoosesHyperparameters`)."""

    metrics: dict[str, float]
    details: dict[str, dict[str, Any]]
    params: dict[str, float] = field(default_factory=dict)


def evaluate(
    recipe: Recipe, catalog: Catalog, model: str, *, device: str = "auto", on_evaluator: EvaluatorCallback | None = None
) -> Evaluation:
    """Run the recipe's evaluators on ``model``: any reference :func:`~clipforge.core.resolver.resolve_model`
    takes (a registered model, a run's model folder on the store, a checkpoint, ...)."""
    if not recipe.evaluation:
        return Evaluation({}, {})
    dev = str(resolve_device(device))
    return evaluate_bundle(recipe, catalog, resolve_model(model, recipe.storage.options).load(dev), dev, on_evaluator)


def evaluate_bundle(
    recipe: Recipe, catalog: Catalog, bundle: EncoderBundle, device: str, on_evaluator: EvaluatorCallback | None = None
) -> Evaluation:
    """Run every evaluator of the recipe on ``bundle``; a dataset's embeddings are computed once for all of them."""
    datasets: dict[str, Any] = {}
    metrics: dict[str, float] = {}
    details: dict[str, dict[str, Any]] = {}
    params: dict[str, float] = {}
    with shared_embeddings():
        for i, ev in enumerate(recipe.evaluation):
            if on_evaluator:
                on_evaluator(i + 1, len(recipe.evaluation), ev.label)
            entry = ev.dataset.entry() if ev.dataset is not None else (recipe.data.eval.entry() if recipe.data.eval else None)
            if entry is None:
                raise ConfigError(f"evaluation.{i} ({ev.type}): no dataset: give it a 'dataset:' entry or set data.eval")
            key = json.dumps(entry, sort_keys=True, default=str)
            if key not in datasets:  # one dataset object per entry, shared by the evaluators that use it
                datasets[key] = catalog.create("datasets", entry)
            evaluator = catalog.create("evaluators", ev.entry())
            chosen = set(evaluator.hyperparameters) if isinstance(evaluator, ChoosesHyperparameters) else set()
            for name, value in evaluator.evaluate(bundle, datasets[key], device).items():
                value = float(value)
                if not math.isfinite(value):
                    raise StageError(f"evaluation.{i} ({ev.label}): metric {name!r} is {value}")
                (params if name in chosen else metrics)[f"eval/{ev.label}/{name}"] = value
            if isinstance(evaluator, ReportsDetails) and evaluator.details:
                details[ev.label] = evaluator.details
    return Evaluation(metrics, details, params)
