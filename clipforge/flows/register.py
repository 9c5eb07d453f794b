"""The register flow: the evaluated model -> an MLflow pyfunc, a registered version, maybe the champion."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient
from prefect import flow
from prefect.artifacts import create_markdown_artifact

import clipforge
from clipforge.core.errors import StageError
from clipforge.flows.common import open_context, require, stage
from clipforge.flows.tracking import mlflow_run
from clipforge.registry import (
    build_report,
    champion_metrics,
    champion_version,
    log_pyfunc_model,
    promote_if_better,
    register_version,
    render_markdown,
    render_model_card,
    set_champion,
)


def promotion_metric(name: str) -> str:
    return name if name.startswith("eval/") else f"eval/{name}"


@flow(name="register", log_prints=True)
def register_flow(recipe: dict[str, Any], run_id: str) -> dict[str, Any]:
    """Log the model to the run, register a version with lineage tags, and promote it if it beats the champion."""
    ctx = open_context(recipe, run_id)
    trained = require(ctx, "register", "train")
    metrics = require(ctx, "register", "evaluate")["metrics"]
    curated = ctx.state.get("curate", {})
    r = ctx.recipe
    with stage(ctx, "register") as result:
        run = mlflow_run(ctx)
        name = r.model_name
        rule = r.registry.promote
        metric = promotion_metric(rule.metric) if rule else None
        if metric and metric not in metrics:
            raise StageError(f"register: promotion metric {metric!r} was not computed; have: {', '.join(sorted(metrics))}")
        parent = champion_version(name)
        lineage = {
            "clipforge.run_id": ctx.run_id,
            "clipforge.version": clipforge.__version__,
            "clipforge.recipe_hash": r.digest(),
            "clipforge.manifest_uri": curated.get("manifest_uri", ""),
            "clipforge.manifest_hash": curated.get("content_hash", ""),
            "clipforge.parent_version": parent or "",
            "clipforge.checkpoint_uri": ctx.store.uri(trained["checkpoint"]),
            "mlflow.source.run_id": run,
        }
        tags = MlflowClient().get_run(run).data.tags
        if "prefect.flow_run_id" in tags:
            lineage["prefect.flow_run_id"] = tags["prefect.flow_run_id"]
        card = render_model_card(model_name=name, recipe_yaml=r.to_yaml(), metrics=metrics, lineage=lineage, version=None)
        with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run):
            model_dir = ctx.store.get_dir(trained["model"], Path(tmp) / "open_clip_model")
            (Path(tmp) / "MODEL_CARD.md").write_text(card)
            mlflow.log_artifacts(str(model_dir), "open_clip_model")
            mlflow.log_artifact(str(Path(tmp) / "MODEL_CARD.md"))
            info = log_pyfunc_model(model_dir, name="model")
        version = register_version(info.model_uri, name, tags=lineage, metrics=metrics, run_id=run)
        # the champion the decision is taken against: read before the alias may move
        incumbent = champion_version(name)
        incumbent_metrics = champion_metrics(name) if incumbent else None
        promoted, previous = (False, parent)
        if rule:
            promoted, previous = promote_if_better(name, version.version, metric=metric, mode=rule.mode, min_delta=rule.min_delta)
            reason = MlflowClient().get_model_version(name, version.version).tags.get("promotion_reason", "")
        elif parent is None:  # without a promotion rule only the first version becomes champion
            set_champion(name, version.version, reason="first version of the model")
            promoted, reason = True, "first version of the model"
        else:
            reason = "the recipe has no registry.promote rule: only a first version becomes champion automatically"
        report = build_report(
            model_name=name, challenger_version=str(version.version), challenger=metrics,
            champion_version=incumbent, champion=incumbent_metrics,
            rule={"metric": metric, "mode": rule.mode, "min_delta": rule.min_delta} if rule else None,
            promoted=promoted, reason=reason,
        )  # fmt: skip
        markdown = render_markdown(report)
        client = MlflowClient()
        client.log_dict(run, report, "evaluation/champion_report.json")
        client.log_text(run, markdown, "evaluation/champion_report.md")
        create_markdown_artifact(key="champion-report", markdown=markdown, description=f"{name} v{version.version} vs champion")
        ctx.state["promoted"] = promoted
        result.update(
            model_name=name, version=str(version.version), promoted=promoted, previous_champion=previous,
            model_uri=info.model_uri, metric=metric, value=metrics.get(metric) if metric else None,
            champion_report=report["tally"], reason=reason,
        )  # fmt: skip
        ctx.plugins.hook.after_model_registered(context=ctx, model_version=version)
        verdict = "is the new champion" if promoted else f"stays challenger (champion: version {previous})"
        print(f"register: {name} version {version.version} {verdict}")
    return ctx.state["register"]
