"""The evaluations a recipe asks for: each evaluator on each evaluation set it runs on."""

from __future__ import annotations

from collections.abc import Iterator

from clipforge.core.errors import ConfigError
from clipforge.core.recipe import ComponentRef, EvaluatorRef, Recipe

#: The index :func:`runs` gives an evaluation that ``data.eval_suite`` adds (it is no ``evaluation:`` item).
SUITE_INDEX = -1


def runs(recipe: Recipe) -> Iterator[tuple[int, EvaluatorRef, str | None, ComponentRef]]:
    """``(index, evaluator, set name, dataset entry)`` of every evaluation to run, in the recipe's order,
    then those of ``data.eval_suite``'s tasks (index :data:`SUITE_INDEX`; their root is read here)."""
    sets = recipe.data.eval_sets()
    for i, ev in enumerate(recipe.evaluation):
        if ev.dataset is not None:
            yield i, ev, None, ev.dataset
            continue
        if not sets:
            if recipe.data.eval_suite is not None:
                continue  # the suite's sets have their own evaluators
            raise ConfigError(f"evaluation.{i} ({ev.type}): no dataset: give it a 'dataset:' entry or set data.eval")
        for name, entry in sets.items():
            if ev.sets is None or name in ev.sets:
                yield i, ev, name, entry
    if recipe.data.eval_suite is not None:
        from clipforge.core.suites import find_suite

        for ev, name, entry in find_suite(recipe.data.eval_suite).runs():
            yield SUITE_INDEX, ev, name, entry
