"""Validating a recipe: its models, every component's params against the catalog, the order of the
curation steps and what the promotion rule names; every error with its field path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pydantic

from clipforge.core.catalog import Catalog
from clipforge.core.errors import RecipeError, UnknownComponentError
from clipforge.core.metrics import EVAL_PREFIX
from clipforge.core.overrides import apply_overrides
from clipforge.core.plugins import get_plugin_manager
from clipforge.core.recipe import EvalSuiteConfig, Recipe, component_entries
from clipforge.core.recipe_yaml import read_yaml
from clipforge.core.suites import GROUPS, RETRIEVAL, SELECTION, SUITE, ZERO_SHOT


def load_recipe(
    source: str | Path | dict[str, Any],
    overrides: list[str] | tuple[str, ...] = (),
    *,
    catalog: Catalog | None = None,
    check_components: bool = True,
) -> Recipe:
    """Read, override and validate a recipe; raise :class:`RecipeError` with every error and its path.

    ``source`` is a YAML path or an already-parsed mapping. Components are checked against the
    catalog of the process-wide plugin manager unless ``catalog`` is given.
    """
    label = "recipe" if isinstance(source, dict) else str(source)
    data = json.loads(json.dumps(source)) if isinstance(source, dict) else read_yaml(source)
    data = apply_overrides(data, overrides)
    errors: list[tuple[str, str]] = []
    recipe = None
    try:
        recipe = Recipe.model_validate(data)
    except pydantic.ValidationError as e:
        # a validator's own message says what is wrong; pydantic's "Value error, " before it says nothing more
        errors += [(_loc(err["loc"]), err["msg"].removeprefix("Value error, ")) for err in e.errors()]
    if check_components:
        if catalog is None:
            catalog = get_plugin_manager().catalog
        errors += check_components_of(data, catalog)
        errors += _check_curation_order(data, catalog)
    if recipe is not None:
        errors += _check_promotion(recipe)
    if errors or recipe is None:
        raise RecipeError(errors, source=label)
    return recipe


def _check_promotion(recipe: Recipe) -> list[tuple[str, str]]:
    """The promotion metric and the guarded ones must come from the recipe's evaluators (and sets)."""
    rule = recipe.registry.promote
    if rule is None:
        return []
    labels = [ev.label for ev in recipe.evaluation]
    sets = [name for name in recipe.data.eval_sets() if name is not None]
    errors = []
    named = [("registry.promote.metric", rule.metric)] + [
        (f"registry.promote.guards.{i}.metric", g.metric) for i, g in enumerate(rule.guards)
    ]
    for path, metric in named:
        parts = metric.removeprefix(EVAL_PREFIX).split("/")
        if recipe.data.eval_suite is not None and (problem := _suite_metric(recipe.data.eval_suite, parts)) is not False:
            if problem:
                errors.append((path, f"{metric!r}: {problem}"))
        elif sets and not (len(parts) >= 3 and parts[0] in sets and parts[1] in labels):
            errors.append(
                (
                    path,
                    f"{metric!r} is not '<set>/<evaluator>/<metric>' of this recipe's sets ({', '.join(sets)}) and evaluators ({', '.join(labels) or 'none'})",
                )
            )
        elif not sets and not (len(parts) >= 2 and parts[0] in labels):
            errors.append(
                (path, f"{metric!r} is not '<evaluator>/<metric>' of an evaluator of this recipe ({', '.join(labels) or 'none'})")
            )
    for i, ev in enumerate(recipe.evaluation):
        unknown = sorted(set(ev.sets or []) - set(sets))
        if unknown:
            errors.append(
                (
                    f"evaluation.{i}.sets",
                    f"no evaluation set {', '.join(map(repr, unknown))}; data.eval names: {', '.join(sets) or 'none'}",
                )
            )
    return errors


def _suite_metric(suite: EvalSuiteConfig, parts: list[str]) -> str | bool:
    """Whether ``parts`` name a metric of the suite: False if not its form, "" if it is, else what is wrong."""
    if parts[0] == SUITE:
        aggregates = ["average", *GROUPS, "tasks", "missing"]
        return (
            "" if len(parts) == 2 and parts[1] in aggregates else f"the suite's aggregates are suite/{{{','.join(aggregates)}}}"
        )
    if len(parts) < 3 or parts[1] not in (ZERO_SHOT, RETRIEVAL, SELECTION):
        return False
    if suite.tasks != "all" and parts[0] not in suite.tasks:
        return f"{parts[0]!r} is not one of data.eval_suite.tasks ({', '.join(suite.tasks)})"
    return ""


def check_components_of(data: dict[str, Any], catalog: Catalog) -> list[tuple[str, str]]:
    """Validate every component entry of a recipe's raw data against its registered params, with full paths."""
    errors: list[tuple[str, str]] = []
    for kind, path, entry in component_entries(data):
        fields = dict(entry)
        name = fields.pop("type")
        try:
            component = catalog.get(kind, name)
        except UnknownComponentError as e:
            errors.append((f"{path}.type", str(e)))
            continue
        _, errs = component.check(fields)
        errors += [(f"{path}.{p}" if p else path, msg) for p, msg in errs]
    return errors


def _check_curation_order(data: dict[str, Any], catalog: Catalog) -> list[tuple[str, str]]:
    """Per-sample steps run in parallel before the whole-dataset steps decide: a recipe listing one
    after the other is refused, naming both (told without building the steps, see
    :meth:`~clipforge.core.catalog.Component.whole_dataset`)."""
    steps = data.get("curation")
    first_whole: tuple[int, str] | None = None
    errors = []
    for i, entry in enumerate(steps if isinstance(steps, list) else []):
        if not (
            isinstance(entry, dict) and isinstance(entry.get("type"), str) and entry["type"] in catalog.names("curation_steps")
        ):
            continue  # malformed or unknown: reported by the other checks
        whole = catalog.get("curation_steps", entry["type"]).whole_dataset({k: v for k, v in entry.items() if k != "type"})
        if whole and first_whole is None:
            first_whole = (i, entry["type"])
        elif whole is False and first_whole is not None:
            errors.append(
                (
                    "curation",
                    f"curation.{i} ({entry['type']}) decides sample by sample and must come before "
                    f"curation.{first_whole[0]} ({first_whole[1]}), which decides over the whole dataset",
                )
            )
    return errors


def _loc(loc: tuple[Any, ...]) -> str:
    # a form of a union chosen by its shape (data.eval) is no part of the recipe's paths
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and p.startswith("__")))
