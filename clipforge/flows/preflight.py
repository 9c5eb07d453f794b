"""What a run would fail on, refused before its first stage: the engine's pre-flight (files, columns,
evaluation sets, the storage root) and the registry's model references, as one error with every
problem and its field path."""

from __future__ import annotations

from clipforge.core.errors import RecipeError
from clipforge.core.plugins import get_plugin_manager
from clipforge.core.recipe import Recipe
from clipforge.engine.preflight import preflight
from clipforge.registry.references import check_model_references


def check_before_run(recipe: Recipe, source: str = "recipe", *, registry: bool = True) -> None:
    """Raise :class:`RecipeError` (``source``: the recipe's file) with every problem found; with
    ``registry`` false (``--offline``), registered models are not looked up."""
    errors = preflight(recipe, get_plugin_manager().catalog) + check_model_references(recipe.as_dict(), registry=registry)
    if errors:
        raise RecipeError(errors, source=source)
