"""What every stage flow shares: the run context, the lifecycle hooks around a stage."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from clipforge.core.context import RunContext
from clipforge.core.errors import StageError
from clipforge.core.plugins import get_plugin_manager
from clipforge.core.recipe import Recipe, load_recipe
from clipforge.core.results import RESULT_TYPES, StageResults
from clipforge.core.storage import Store

STAGES = tuple(RESULT_TYPES)
R = TypeVar("R")


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def open_context(recipe: Recipe | dict[str, Any], run_id: str | None = None) -> RunContext:
    """The context of run ``run_id`` (its saved state when it exists), or of a new run."""
    plugins = get_plugin_manager()
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, catalog=plugins.catalog)
    store = Store(recipe.storage.root, recipe.storage.options)
    ctx = RunContext(recipe=recipe, store=store, run_id=run_id or new_run_id(), plugins=plugins)
    if run_id and store.exists(f"{ctx.run_dir}/run.json"):
        saved = store.read_json(f"{ctx.run_dir}/run.json")
        ctx.mlflow_run_id = saved.get("mlflow_run_id")
        ctx.state = StageResults.from_dict(saved.get("state", {}))
    return ctx


def require(ctx: RunContext, stage: str, needs: str) -> Any:
    """The result of an earlier stage, or a clear error saying which stage to run first."""
    result = getattr(ctx.state, needs)
    if result is None:
        raise StageError(
            f"{stage}: run {ctx.run_id} has no {needs} output yet; run the {needs} stage first "
            f"(clipforge run RECIPE --stage {needs} --run-id {ctx.run_id})"
        )
    return result


def run_stage(ctx: RunContext, name: str, body: Callable[[], R]) -> R:
    """Run a stage's ``body`` between the lifecycle hooks; its result is saved in ``run.json`` before
    ``after_stage`` sees it. ``on_stage_error`` runs on failure, then the error goes on."""
    hook = ctx.plugins.hook
    hook.before_stage(stage=name, context=ctx)
    try:
        result = body()
    except BaseException as e:
        hook.on_stage_error(stage=name, context=ctx, error=e)
        raise
    setattr(ctx.state, name, result)
    ctx.save_state()
    hook.after_stage(stage=name, context=ctx, result=result)
    return result
