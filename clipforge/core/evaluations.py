"""The evaluations a recipe asks for: each evaluator on each evaluation set it runs on."""

from __future__ import annotations

from collections.abc import Iterator

from clipforge.core.errors import ConfigError
from clipforge.core.recipe import ComponentRef, EvaluatorRef, Recipe


def runs(recipe: Recipe) -> Iterator[tuple[int, EvaluatorRef, str | None, ComponentRef]]:
    """``(index, evaluator, set name, dataset entry)`` of every evaluation to run, in the recipe's order."""
    sets = recipe.data.eval_sets()
    for i, ev in enumerate(recipe.evaluation):
        if ev.dataset is not None:
            yield i, ev, None, ev.dataset
            continue
        if not sets:
            raise ConfigError(f"evaluation.{i} ({ev.type}): no dataset: give it a 'dataset:' entry or set data.eval")
        for name, entry in sets.items():
            if ev.sets is None or name in ev.sets:
                yield i, ev, name, entry
