"""The retrain flow: curate -> train -> evaluate -> register, one MLflow run, resumable by run id.

``retrain_recipe`` is what deployments schedule: a recipe *path* and ``--set`` style overrides,
so that ``prefect deployment run ... --param`` can change them, and the location of new training
data, which a deployment trigger takes from a ``clipforge.data.arrived`` event (flows/events.py).
"""

from __future__ import annotations

import contextlib
import os
import time
import traceback
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, tags

from clipforge.core.errors import ConfigError
from clipforge.core.recipe import Recipe
from clipforge.core.stages import STAGES, RetrainResult
from clipforge.core.validation import load_recipe
from clipforge.flows.reporting import publish, run_logger, say
from clipforge.flows.stage import flow_run_id_or_new, flow_run_name, run_tags, stage_flow_of, start_run, tag_flow_run
from clipforge.registry import tracking


@flow(name="retrain", log_prints=True, flow_run_name=flow_run_name)
def retrain_flow(
    recipe: Recipe | dict[str, Any],
    run_id: str | None = None,
    stages: list[str] | None = None,
    tracking_uri: str | None = None,
    artifact_root: str | None = None,
) -> RetrainResult:
    """Run the recipe's ``stages`` (default: all, in the order of :data:`~clipforge.core.stages.STAGES`)
    as subflows; with the ``run_id`` of a failed run, completed stages are skipped. ``recipe`` is a
    validated :class:`~clipforge.Recipe`, or a mapping validated here. The Prefect flow run is named
    ``<recipe>-<run id>`` and tagged with the recipe, the model and the stage; so are its stages' flow runs."""
    if tracking_uri:
        tracking.use_tracking_uri(tracking_uri)
    ctx = start_run(recipe if isinstance(recipe, Recipe) else load_recipe(recipe), run_id or flow_run_id_or_new())
    tag_flow_run(run_tags(ctx.recipe, "retrain"))
    run = tracking.mlflow_run(ctx, artifact_root)
    tracking.mark_running(run)
    log = run_logger()  # the retrain's own log in the Prefect UI; the terminal shows the stages' lines
    log.info("retrain %s of recipe %r (MLflow run %s): stages %s", ctx.run_id, ctx.recipe.name, run, ", ".join(stages or STAGES))
    try:
        for name in STAGES:
            if stages is not None and name not in stages:
                continue
            if name in ctx.state.done():
                say(f"{name}: already done in run {ctx.run_id}, skipped")
                continue
            # the stage flow opens the run from the store and saves its result there, for the next one
            stage = stage_flow_of(name).with_options(flow_run_name=f"{ctx.recipe.name}-{ctx.run_id}")
            log.info("%s: started", name)
            start = time.perf_counter()
            with tags(*run_tags(ctx.recipe, name)):
                ctx.state.set(name, stage(ctx.run_id, ctx.recipe.storage))
            log.info("%s: finished in %.0f s", name, time.perf_counter() - start)
    except BaseException as e:
        tracking.finish_run(run, e, traceback.format_exc())
        with contextlib.suppress(Exception):  # the link is a convenience: never hide the error behind its own
            link_mlflow_run(run, ctx.run_id, failed=True)
        raise
    tracking.finish_run(run)
    link_mlflow_run(run, ctx.run_id)
    log.info("retrain %s finished: %s", ctx.run_id, ", ".join(ctx.state.done()))
    return RetrainResult(ctx.state, run_id=ctx.run_id, mlflow_run_id=run, store=ctx.store.uri(ctx.run_dir))


def link_mlflow_run(run: str, run_id: str, failed: bool = False) -> None:
    """A Prefect artifact that leads from the flow run to its MLflow run: a link on the tracking server,
    or, for a local store, how to serve it and where the run will then be."""
    from clipforge.registry import mlflow_ui_command, run_url

    uri = tracking.tracking_uri()
    url = run_url(uri, tracking.experiment_of(run), run)
    what = f"MLflow run of retrain {run_id}" + (" (failed: its error is in the run's tags and error.txt)" if failed else "")
    if uri.startswith(("http://", "https://")):
        publish("link", "mlflow-run", what, link=url, link_text=run)
        return
    publish(
        "markdown",
        "mlflow-run",
        what,
        markdown=(
            f"# {what}\n\n- tracking URI: `{uri}` (a local store: nothing serves it yet)\n- run id: `{run}`\n"
            f"- browse: `{mlflow_ui_command(uri)}`, then open [{url}]({url})\n"
        ),
    )


def _recipe_run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters
    return f"{Path(params['recipe_path']).stem}-{params.get('run_id') or flow_run_id_or_new()}"


#: The fields of a dataset entry that say where its data is: a webdataset's shards, a table's file.
LOCATION_FIELDS = ("urls", "path")


def location_override(recipe_path: str, overrides: list[str], location: str) -> str:
    """The ``--set`` override that points the recipe's training data at ``location``: its dataset's
    location field (:data:`LOCATION_FIELDS`), the value quoted by YAML's emitter so that the override
    reads back as this very string, whatever it holds."""
    from clipforge.core.overrides import apply_overrides
    from clipforge.core.plugins import get_plugin_manager
    from clipforge.core.recipe_yaml import read_yaml

    train = (apply_overrides(read_yaml(recipe_path), overrides).get("data") or {}).get("train")
    if isinstance(train, list):
        raise ConfigError(
            f"data_location {location!r}: {recipe_path}'s data.train is a mixture; point one source at it with "
            "--set data.train.N.source.urls=... (or .path=...)"
        )
    if not isinstance(train, dict) or not isinstance(train.get("type"), str):
        raise ConfigError(f"data_location {location!r}: {recipe_path} has no data.train dataset entry to point at it")
    component = get_plugin_manager().catalog.get("datasets", train["type"])
    fields = component.params.model_fields if component.params is not None else {}
    field = next((f for f in LOCATION_FIELDS if f in fields), None)
    if field is None:
        raise ConfigError(
            f"data_location {location!r}: the training data's dataset {train['type']!r} has no location field "
            f"({' or '.join(LOCATION_FIELDS)}); use a webdataset, csv or parquet entry in data.train"
        )
    quoted = yaml.dump(location, default_style='"', width=float("inf"), allow_unicode=True).rstrip("\n")
    return f"data.train.{field}={quoted}"


@flow(name="retrain-recipe", log_prints=True, retries=1, retry_delay_seconds=600, flow_run_name=_recipe_run_name)
def retrain_recipe(
    recipe_path: str,
    overrides: list[str] | None = None,
    tracking_uri: str | None = None,
    artifact_root: str | None = None,
    run_id: str | None = None,
    data_location: str | None = None,
) -> RetrainResult:
    """Retrain the recipe at ``recipe_path`` with ``overrides`` (``train.epochs=3``, ...): what deployments schedule.

    ``data_location`` points the recipe's training data at new data (a webdataset's ``urls``, a
    table's ``path``): what a deployment triggered by a ``clipforge.data.arrived`` event passes.
    A failed attempt is retried once after 10 minutes; the retry continues the same run, so the
    stages that had finished are skipped and training resumes from its latest checkpoint.
    ``tracking_uri`` defaults to ``MLFLOW_TRACKING_URI``, else ``mlflow.db`` in the working directory.
    """
    from clipforge.registry import default_tracking_uri

    overrides = list(overrides or [])
    if data_location is not None:
        overrides.append(location_override(recipe_path, overrides, data_location))
        say(f"training data: {data_location}")
    recipe = load_recipe(recipe_path, overrides)
    if not tracking_uri and not os.environ.get("MLFLOW_TRACKING_URI"):  # as the command line: artifacts beside mlflow.db
        artifact_root = artifact_root or str(Path("mlartifacts").resolve())
    return retrain_flow(
        recipe,
        run_id=run_id or flow_run_id_or_new(),
        tracking_uri=tracking_uri or default_tracking_uri(),
        artifact_root=artifact_root,
    )
