"""What every stage flow shares: the run context, the lifecycle hooks around a stage."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from clipforge.core.context import RunContext
from clipforge.core.errors import StageError
from clipforge.core.plugins import get_plugin_manager
from clipforge.core.recipe import Recipe
from clipforge.core.results import RESULT_TYPES, StageResults
from clipforge.core.storage import Store
from clipforge.core.validation import load_recipe

STAGES = tuple(RESULT_TYPES)
R = TypeVar("R")


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def flow_run_id_or_new() -> str:
    """A run id derived from the Prefect flow run (so that a retry of that flow run resumes the same
    run folder, and its name can be known before the flow starts); a new one outside a flow run."""
    from prefect.runtime import flow_run

    if flow_run.id and flow_run.scheduled_start_time:
        return f"{flow_run.scheduled_start_time:%Y%m%d-%H%M%S}-{str(flow_run.id).replace('-', '')[:6]}"
    return new_run_id()


def flow_run_name() -> str:
    """The Prefect flow run's name: ``<recipe name>-<run id>``, the same for a retrain and its stages,
    so that a retrain is found by the run id clipforge prints (the flow's name tells the stage)."""
    from prefect.runtime import flow_run

    params = flow_run.parameters
    recipe = params.get("recipe")
    name = recipe.get("name", "recipe") if isinstance(recipe, dict) else "recipe"
    return f"{name}-{params.get('run_id') or flow_run_id_or_new()}"


def run_tags(recipe: Recipe, stage: str) -> list[str]:
    """The tags of a retrain's Prefect flow runs: the recipe, the registered model, the stage."""
    return [f"recipe:{recipe.name}", f"model:{recipe.model_name}", f"stage:{stage}"]


def tag_flow_run(tags: list[str]) -> None:
    """Add ``tags`` to the current Prefect flow run (a flow cannot declare tags; its subflows inherit
    those of ``prefect.tags`` around their call, the run itself only gets them this way)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    if not flow_run.id:
        return
    with get_client(sync_client=True) as client:
        current = client.read_flow_run(uuid.UUID(flow_run.id)).tags
        client.update_flow_run(uuid.UUID(flow_run.id), tags=sorted({*current, *tags}))


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
