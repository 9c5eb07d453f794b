"""The register flow: the evaluated model -> an MLflow pyfunc, a registered version, maybe the champion."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import clipforge
from clipforge.core.bootstrap import per_sample_from
from clipforge.core.components import PerSample
from clipforge.core.context import RunContext
from clipforge.core.errors import StageError
from clipforge.core.metrics import EVAL_PREFIX, eval_name, metric_key
from clipforge.core.results import CurateResult, EvaluateResult, RegisterResult, TrainResult
from clipforge.engine.evaluation import Evaluation, evaluate
from clipforge.flows.approval import BY_TAG, FLOW_RUN_TAG, REASON_TAG, STATE_TAG, Approval, current_flow_run_id, wait_for_approval
from clipforge.flows.evaluate import EVAL_HASH_TAG, PER_SAMPLE_FILE, per_sample_json
from clipforge.flows.events import emit_promotion
from clipforge.flows.reporting import publish, say
from clipforge.flows.stage import stage_flow
from clipforge.registry import build_report, model_summary, render_markdown, render_model_card, tracking
from clipforge.registry.promotion import Judgement


def _lineage(ctx: RunContext, trained: TrainResult, run: str, parent: str | None) -> dict[str, str]:
    """The tags that lead from a model version back to its data, recipe, run and predecessor."""
    curated = ctx.state.get(CurateResult)
    lineage = {
        "clipforge.run_id": ctx.run_id,
        "clipforge.version": clipforge.__version__,
        "clipforge.recipe_hash": ctx.recipe.digest(),
        "clipforge.manifest_uri": curated.manifest_uri if curated else "",
        "clipforge.manifest_hash": curated.content_hash if curated else "",
        "clipforge.replay_uri": curated.replay.uri if curated and curated.replay else "",
        "clipforge.parent_version": parent or "",
        "clipforge.checkpoint_uri": ctx.store.uri(trained.checkpoint),
        "clipforge.init_from": trained.init_from or "",
        "clipforge.base_model": trained.base_model or "",
        "clipforge.adapter_uri": ctx.store.uri(trained.adapter) if trained.adapter else "",
        "clipforge.ema_decay": "" if trained.ema_decay is None else str(trained.ema_decay),
        "mlflow.source.run_id": run,
    }
    if "prefect.flow_run_id" in (tags := tracking.run_tags(run)):
        lineage["prefect.flow_run_id"] = tags["prefect.flow_run_id"]
    return lineage


@stage_flow("register")
def register_flow(ctx: RunContext, trained: TrainResult, evaluated: EvaluateResult) -> RegisterResult:
    """Log the model to the run, register a version with lineage tags, and promote it if it beats the champion."""
    r = ctx.recipe
    metrics, name, rule = evaluated.metrics, r.model_name, r.registry.promote
    run = tracking.mlflow_run(ctx)
    metric = eval_name(rule.metric) if rule else None
    guards = [(eval_name(g.metric), g.max_drop) for g in rule.guards] if rule else []
    gating = [m for m in [metric, *(g for g, _ in guards)] if m]
    if missing := [m for m in gating if m not in metrics]:
        raise StageError(
            f"register: promotion metric(s) {', '.join(map(repr, missing))} not computed; have: {', '.join(sorted(metrics))}"
        )
    parent = tracking.champion_version(name)
    lineage = _lineage(ctx, trained, run, parent) | {EVAL_HASH_TAG: evaluated.data_hash}
    curated = ctx.state.get(CurateResult)
    replayed = curated.replay if curated else None
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = ctx.store.get_dir(trained.model, Path(tmp) / "open_clip_model")
        embed_dim = json.loads((model_dir / "open_clip_config.json").read_text())["model_cfg"].get("embed_dim")
        card = render_model_card(
            model_name=name, recipe_yaml=r.to_yaml(), metrics=metrics, lineage=lineage, version=None, embed_dim=embed_dim,
            replay=replayed.model_dump(mode="json") if replayed else None, seen=trained.seen,
        )  # fmt: skip
        info = tracking.log_model(run, model_dir, card, step=trained.steps)
        if trained.adapter:  # the adapter alone (peft's format) beside the merged model, with the base it belongs to
            adapter_dir = ctx.store.get_dir(trained.adapter, Path(tmp) / "adapter")
            tracking.log_artifacts(run, adapter_dir, "adapter")
    if info.model_id:
        tracking.log_model_metrics(run, info.model_id, r, metrics)
    # a version carries the metrics its promotion is decided on; the run holds them all
    version = tracking.register_version(
        info.model_uri, name, tags=lineage, metrics={m: metrics[m] for m in gating}, run_id=run, model_id=info.model_id,
        description=f"Registered by retrain `{ctx.run_id}`; its promotion is being decided.",
    )  # fmt: skip
    _link(ctx, name, str(version.version), info.model_id)
    same_data = _metrics_on(ctx, evaluated, str(version.version))
    # the champion the decision is taken against: read (and evaluated when it must be) before the alias may move
    incumbent = tracking.champion_version(name)
    incumbent_metrics = same_data(incumbent) if incumbent else None
    if incumbent_metrics:
        tracking.log_metrics(run, {f"champion/{k}": v for k, v in incumbent_metrics.items()})
    judged: Judgement | None = None
    if rule and metric:
        gate: dict[str, Any] = {
            "metric": metric, "mode": rule.mode, "min_delta": rule.min_delta, "metrics_of": same_data,
            "guards": [(eval_name(g.metric), g.max_drop, g.confidence) for g in rule.guards],
            "confidence": rule.confidence, "resamples": rule.resamples, "seed": rule.seed,
            "samples_of": _samples_on(ctx, evaluated, str(version.version)) if rule.gates_on_samples() else None,
        }  # fmt: skip
        judged = tracking.judge_promotion(name, version.version, **gate)(incumbent)
        answer = _approval(ctx, name, str(version.version), judged) if rule.approval and judged.better else None
        if answer is not None and not answer.approve:
            promoted, previous = False, incumbent
            who = answer.user or "a reviewer"
            tracking.tag_version(
                name, str(version.version),
                {"promotion_reason": f"not promoted: rejected by {who}: {answer.reason or 'no reason given'}"},
            )  # fmt: skip
        else:
            promoted, previous = tracking.promote_if_better(name, version.version, **gate)
    else:
        promoted, previous = tracking.promote_first_version(name, version.version)
    reason = tracking.version_tags(name, version.version).get("promotion_reason", "")
    interval = judged.interval.as_dict() if judged and judged.interval else None
    report = build_report(
        model_name=name, challenger_version=str(version.version), challenger=metrics,
        champion_version=incumbent, champion=incumbent_metrics,
        rule={"metric": metric, "mode": rule.mode, "min_delta": rule.min_delta, "confidence": rule.confidence} if rule else None,
        promoted=promoted, reason=reason,
    )  # fmt: skip
    if interval:
        report["decision"]["interval"] = interval
    markdown = render_markdown(report)
    tracking.log_dict(run, report, "evaluation/champion_report.json")
    tracking.log_text(run, markdown, "evaluation/champion_report.md")
    publish("markdown", "champion-report", f"{name} v{version.version} vs champion", markdown=markdown)
    # the hook's plugins read the decision from context.state.register
    decision = RegisterResult(
        model_name=name, version=str(version.version), promoted=promoted, previous_champion=previous,
        model_uri=info.model_uri, metric=metric, value=metrics.get(metric) if metric else None,
        champion_report=report["tally"], reason=reason, interval=interval,
    )  # fmt: skip
    emit_promotion(name, str(version.version), promoted, {
        "metric": metric, "value": decision.value, "previous_champion": previous, "champion": incumbent,
        "delta": None if not (metric and incumbent_metrics) else _delta(metrics, incumbent_metrics, metric),
        "interval": interval, "reason": reason,
        "guard": tracking.version_tags(name, str(version.version)).get("promotion_guard", "") if not promoted else "",
    })  # fmt: skip
    ctx.state.set("register", decision)
    ctx.plugins.hook.after_model_registered(context=ctx, model_version=version)
    tracking.describe_version(name, str(version.version), _described(ctx, run, str(version.version), parent, promoted, reason))
    verdict = "is the new champion" if promoted else f"stays challenger (champion: version {previous})"
    say(f"register: {name} version {version.version} {verdict}: {reason}")
    return decision


def _metrics_on(ctx: RunContext, evaluated: EvaluateResult, ours: str) -> Callable[[str], dict[str, float]]:
    """A version's metrics on this run's evaluation data (once per version): its run's when they were
    measured on the same data, else the store's cached evaluation of it, else a new one, cached."""
    name, known = ctx.recipe.model_name, {ours: evaluated.metrics}

    def metrics_of(version: str) -> dict[str, float]:
        if version not in known:
            known[version] = _evaluated_again(ctx, name, version, evaluated.data_hash)
        return known[version]

    return metrics_of


def _evaluated_again(ctx: RunContext, name: str, version: str, data_hash: str) -> dict[str, float]:
    tags = tracking.version_tags(name, version)
    source = tags.get("mlflow.source.run_id")
    if data_hash and tags.get(EVAL_HASH_TAG) == data_hash and source and (measured := tracking.run_metrics(source, EVAL_PREFIX)):
        return measured
    cached = _cached(name, version, data_hash)
    if ctx.store.exists(cached):
        return dict(ctx.store.read_json(cached))
    return _evaluate_version(ctx, name, version, data_hash).metrics


def _cached(name: str, version: str, data_hash: str, what: str = "") -> str:
    return f"cache/evaluations/{name}/v{version}-{data_hash[:16]}{what}.json"


def _evaluate_version(ctx: RunContext, name: str, version: str, data_hash: str) -> Evaluation:
    """Evaluate a registered version on this run's evaluation data; its metrics and per-sample results are cached."""
    say(f"register: {name} v{version} was measured on other evaluation data; evaluating it on this run's")
    evaluation = evaluate(ctx.recipe, ctx.plugins.catalog, f"models:/{name}/{version}", device=ctx.recipe.train.device)
    ctx.store.write_json(_cached(name, version, data_hash, ".per_sample"), per_sample_json(evaluation))
    ctx.store.write_json(_cached(name, version, data_hash), evaluation.metrics)
    return evaluation


def _samples_on(ctx: RunContext, evaluated: EvaluateResult, ours: str) -> Callable[[str], dict[str, PerSample]]:
    """A version's per-sample results on this run's evaluation data (once per version): this run's, the
    run's of a version measured on the same data (its ``per_sample.json`` on the store), else the
    store's cached evaluation of it, else a new one."""
    name, data_hash = ctx.recipe.model_name, evaluated.data_hash
    known: dict[str, dict[str, PerSample]] = {}

    def read(uri_or_rel: str) -> dict[str, PerSample]:
        return {k: per_sample_from(v) for k, v in ctx.store.read_json(uri_or_rel).items()}

    def samples_of(version: str) -> dict[str, PerSample]:
        if version in known:
            return known[version]
        if version == ours:
            known[version] = read(_relative(ctx, evaluated.per_sample_uri)) if evaluated.per_sample_uri else {}
            return known[version]
        tags = tracking.version_tags(name, version)
        theirs = f"runs/{tags.get('clipforge.run_id', '')}/evaluate/{PER_SAMPLE_FILE}"
        cached = _cached(name, version, data_hash, ".per_sample")
        if data_hash and tags.get(EVAL_HASH_TAG) == data_hash and tags.get("clipforge.run_id") and ctx.store.exists(theirs):
            known[version] = read(theirs)
        elif ctx.store.exists(cached):
            known[version] = read(cached)
        else:
            known[version] = dict(_evaluate_version(ctx, name, version, data_hash).per_sample)
        return known[version]

    return samples_of


def _relative(ctx: RunContext, uri: str) -> str:
    """A URI the store wrote, as a path relative to its root."""
    root = ctx.store.uri()
    return uri[len(root) :].lstrip("/") if uri.startswith(root) else uri


def _delta(ours: dict[str, float], theirs: dict[str, float], metric: str) -> float | None:
    key = metric_key(metric)
    a = next((v for k, v in theirs.items() if metric_key(eval_name(k)) == key), None)
    b = next((v for k, v in ours.items() if metric_key(eval_name(k)) == key), None)
    return None if a is None or b is None else b - a


def _approval(ctx: RunContext, name: str, version: str, judged: Judgement) -> Approval:
    """Pause until a person approves ``version`` taking champion; the version says it is waiting, and for whom."""
    rule = ctx.recipe.registry.promote
    assert rule is not None
    run_id = current_flow_run_id()
    tracking.tag_version(name, version, {STATE_TAG: "pending", FLOW_RUN_TAG: run_id})
    say(f"register: {name} v{version} waits for approval: {judged.reason}; answer with `clipforge approve {name} {version}`")
    answer = wait_for_approval(f"{name} v{version}: {judged.reason}", rule.approval_timeout_s)
    tracking.tag_version(
        name, version,
        {STATE_TAG: "approved" if answer.approve else "rejected", BY_TAG: answer.user or "unknown", REASON_TAG: answer.reason},
    )  # fmt: skip
    return answer


def _link(ctx: RunContext, name: str, version: str, model_id: str | None) -> None:
    """The logged model leads to its version in the MLflow UI; the registered model says what it is."""
    if model_id:
        tracking.link_logged_model(model_id, name, version)
    tracking.describe_model(name, model_summary(ctx.recipe.to_yaml()))


def _described(ctx: RunContext, run: str, version: str, parent: str | None, promoted: bool, reason: str) -> str:
    """The version's description: whether it was promoted and why, and what changed since the champion
    it was weighed against (the recipe's fields, the curated data)."""
    verdict = "**Promoted to champion.**" if promoted else "**Not promoted**: it stays challenger."
    reason = reason.removeprefix("not promoted: ")  # the verdict says it already
    lines = [f"{verdict} {reason[:1].upper()}{reason[1:].rstrip('.')}.", ""]
    if parent is None:
        lines.append(f"The first version: trained by retrain `{ctx.run_id}`.")
        return "\n".join(lines)
    parent_run = tracking.version_run(ctx.recipe.model_name, parent)
    ours, theirs = tracking.run_params(run), tracking.run_params(parent_run) if parent_run else {}
    # the recipe's fields (eval/ params are settings evaluators chose; storage is where, not what)
    changed = [
        k for k in sorted(ours.keys() | theirs.keys())
        if ours.get(k) != theirs.get(k) and not k.startswith((EVAL_PREFIX, "storage."))
    ]  # fmt: skip
    lines.append(f"Changed since version {parent} (the champion it was weighed against), trained by retrain `{ctx.run_id}`:")
    lines += [f"- `{k}`: {theirs.get(k, '(unset)')} → {ours.get(k, '(unset)')}" for k in changed[:20]]
    if len(changed) > 20:
        lines.append(f"- and {len(changed) - 20} more recipe fields")
    curated, before = (
        ctx.state.get(CurateResult),
        tracking.version_tags(ctx.recipe.model_name, parent).get("clipforge.manifest_hash"),
    )
    if curated is not None and curated.content_hash != before:
        lines.append(f"- the curated data: {curated.kept:,} pairs, content hash `{curated.content_hash[:12]}`")
    if len(lines) == 3:
        lines.append("- nothing: the same recipe on the same data")
    return "\n".join(lines)
