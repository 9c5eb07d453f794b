"""What every stage flow shares: the run it works on, its inputs, the lifecycle hooks around it.

A stage module keeps only its body, ``body(ctx, *needed results) -> result``, decorated with
:func:`stage_flow`: the flow opens the run from the store, hands the body the results its row of
:data:`~clipforge.core.stages.STAGES` needs, fires the hooks and saves the result in ``run.json``,
the one way a result reaches the next stage.
"""

from __future__ import annotations

import datetime as dt
import importlib
import inspect
import typing
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from prefect import Flow, flow
from pydantic import BaseModel

from clipforge.core.context import RunContext, check_run_id
from clipforge.core.errors import StageError
from clipforge.core.plugins import get_plugin_manager
from clipforge.core.recipe import Recipe, StorageConfig
from clipforge.core.stages import STAGES, StageResults
from clipforge.core.storage import Store

R = TypeVar("R")
Body = Callable[..., BaseModel]


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
    """The retrain's Prefect flow run name: ``<recipe name>-<run id>``, which its stages' flow runs
    share, so that a retrain is found by the run id clipforge prints (the flow's name tells the stage)."""
    from prefect.runtime import flow_run

    params = flow_run.parameters
    recipe = params.get("recipe")
    name = recipe.name if isinstance(recipe, Recipe) else recipe.get("name", "recipe") if isinstance(recipe, dict) else "recipe"
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


def start_run(recipe: Recipe, run_id: str) -> RunContext:
    """The run ``run_id`` of ``recipe`` (a validated recipe): what an earlier attempt of it finished
    is kept, the recipe is this one; saved, so that its stage flows open it from the store."""
    store = Store(recipe.storage.root, recipe.storage.options)
    saved = _saved(store, run_id) or {}
    ctx = RunContext(
        recipe=recipe,
        store=store,
        run_id=run_id,
        plugins=get_plugin_manager(),
        mlflow_run_id=saved.get("mlflow_run_id"),
        state=StageResults.from_dict(saved.get("state", {})),
    )
    ctx.save_state()
    return ctx


def open_run(run_id: str, storage: StorageConfig) -> RunContext:
    """The run ``run_id`` as :func:`start_run` saved it on the store: its recipe (validated when the
    run started, read back as typed data), its MLflow run, its stages' results."""
    store = Store(storage.root, storage.options)
    saved = _saved(store, run_id)
    if saved is None:
        raise StageError(f"run {run_id} has not been started on {store.uri()}: no runs/{run_id}/run.json")
    return RunContext(
        recipe=Recipe.model_validate(saved["recipe"]),
        store=store,
        run_id=run_id,
        plugins=get_plugin_manager(),
        mlflow_run_id=saved.get("mlflow_run_id"),
        state=StageResults.from_dict(saved.get("state", {})),
    )


def _saved(store: Store, run_id: str) -> dict[str, Any] | None:
    """What ``run.json`` of run ``run_id`` holds (written by :meth:`RunContext.save_state`), if it exists."""
    path = f"runs/{check_run_id(run_id)}/run.json"
    return dict(store.read_json(path)) if store.exists(path) else None


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
    if not isinstance(result, BaseModel):
        raise TypeError(f"the {name} stage returned a {type(result).__name__}, not its result")
    ctx.state.set(name, result)
    ctx.save_state()
    hook.after_stage(stage=name, context=ctx, result=result)
    return result


#: The flow of each stage, as :func:`stage_flow` made it; :func:`stage_flow_of` imports its module.
STAGE_FLOWS: dict[str, Flow[..., BaseModel]] = {}


def stage_flow_of(name: str) -> Flow[..., BaseModel]:
    """The flow of stage ``name``: ``clipforge.flows.<name>`` defines it with :func:`stage_flow`."""
    if name not in STAGE_FLOWS:
        importlib.import_module(f"clipforge.flows.{name}")
    return STAGE_FLOWS[name]


def stage_flow(name: str) -> Callable[[Body], Flow[..., BaseModel]]:
    """The Prefect flow of stage ``name``, around ``body(ctx, *results)``: the flow takes the run id
    and the store, opens the run, checks that the results its row needs are there and gives them to
    the body in the row's order, between the lifecycle hooks; the body's result is saved and returned.

    The body's annotations must match the row (checked here, when the stage module is imported).
    """
    stage = STAGES[name]

    def decorate(body: Body) -> Flow[..., BaseModel]:
        hints = typing.get_type_hints(body)
        params = list(inspect.signature(body).parameters)[1:]  # after ctx
        expected = [STAGES[n].result for n in stage.needs]
        if [hints.get(p) for p in params] != expected or hints.get("return") is not stage.result:
            raise TypeError(
                f"{body.__qualname__}: the {name} stage's body takes (ctx, {', '.join(t.__name__ for t in expected)}) "
                f"and returns a {stage.result.__name__}, as clipforge.core.stages.STAGES says"
            )

        def run(run_id: str, storage: StorageConfig) -> BaseModel:
            ctx = open_run(run_id, storage)
            needed = [ctx.state.require(name, n, run_id) for n in stage.needs]
            return run_stage(ctx, name, lambda: body(ctx, *needed))

        run.__name__ = run.__qualname__ = f"{name}_flow"
        run.__module__, run.__doc__ = body.__module__, body.__doc__
        run.__annotations__ = {"run_id": str, "storage": StorageConfig, "return": stage.result}  # types, not strings
        STAGE_FLOWS[name] = flow(name=name, log_prints=True, flow_run_name=f"{name}-{{run_id}}")(run)
        return STAGE_FLOWS[name]

    return decorate
