"""The train flow: curated shards -> checkpoints and an open_clip model folder on the store."""

from __future__ import annotations

from typing import Any

from clipforge.core.context import RunContext
from clipforge.core.errors import ConfigError
from clipforge.core.hashing import content_hash
from clipforge.core.recipe import Recipe
from clipforge.core.resolver import HF_HUB, pin_model
from clipforge.core.results import CurateResult, SourceShards, TrainResult
from clipforge.core.storage import Store
from clipforge.engine.training.job import TrainJob
from clipforge.flows.figures import loss_figure
from clipforge.flows.reporting import FileWatcher, Progress, say
from clipforge.flows.stage import stage_flow
from clipforge.registry import tracking


def training_key(recipe: Recipe, curated: CurateResult) -> str:
    """What a training's result depends on: the curated data's content, the model, the loss, the train settings."""
    spec: dict[str, Any] = {
        "data": curated.content_hash,
        "model": {k: _pinned(v) for k, v in recipe.model.entry().items()},
        "loss": recipe.loss.entry(),
        # how often it logs and how many loader workers it has change nothing of what it trains
        "train": recipe.train.model_dump(mode="json", exclude={"log_every", "workers"}),
    }
    if (
        pinned := _pinned(recipe.train.init_model)
    ) != recipe.train.init_model:  # an alias that moved, a hub revision that moved: another start, another training
        spec["init_from"] = pinned
    if curated.replay:
        spec["replay"] = curated.replay.content_hash
    return content_hash(spec, 16)


def training_sources(recipe: Recipe, curated: CurateResult) -> list[SourceShards] | None:
    """What a recipe that draws by weight draws from: the mixture's sources (or its one dataset) and the
    replay, weighted to be ``data.replay.fraction`` of the samples; None for epochs over one stream."""
    if not recipe.draws_by_weight():
        return None
    return curated.training_sources(recipe.data.replay.fraction if recipe.data.replay else None)


def _pinned(value: object) -> object:
    """A model reference as the weights it names now (a missing one as missing); anything else as it is."""
    if not (isinstance(value, str) and value.startswith(("models:/", HF_HUB))):
        return value
    try:
        return pin_model(value)
    except ConfigError:
        return {"missing": value}


def finished_training(store: Store, key: str) -> TrainResult | None:
    """The result of an earlier complete training with this key, if the store still holds it."""
    index = f"cache/train/{key}.json"
    if not store.exists(index):
        return None
    result = TrainResult.model_validate(store.read_json(index)["result"])
    done = result.model.rsplit("/", 1)[0]
    return result if store.exists(f"{done}/result.json") else None


@stage_flow("train")
def train_flow(ctx: RunContext, curated: CurateResult) -> TrainResult:
    """Train the recipe's model on the run's curated data; resumes from the run's latest checkpoint.

    A training that already finished with the same data and settings (in an earlier, failed
    retrain for instance) is reused instead of redone: ``cache/train/<key>.json`` points at it.
    """
    run = tracking.mlflow_run(ctx)
    key = training_key(ctx.recipe, curated)
    out = f"{ctx.run_dir}/train"
    earlier = finished_training(ctx.store, key)
    if earlier and not ctx.store.exists(f"{out}/result.json"):
        out = earlier.model.rsplit("/", 1)[0]
        say(f"train: reusing the finished training {ctx.store.uri(out)} (same data and settings)")
        tracking.set_tags(run, {"clipforge.train_reused_from": ctx.store.uri(out)})
        result = earlier.model_copy(update={"reused": True, "key": key})
    else:
        if not ctx.store.exists(f"{out}/result.json"):  # a finished training is not launched again
            launcher = ctx.plugins.catalog.create("launchers", ctx.recipe.train.launcher.entry())
            job = TrainJob(
                recipe=ctx.recipe, run_id=ctx.run_id, state=ctx.state, mlflow_run_id=run, out=out,
                shards=curated.training_shards(), step_log=tracking.StepLog(tracking.tracking_uri(), run),
                sources=training_sources(ctx.recipe, curated),
            )  # fmt: skip
            with _followed(ctx, out):
                launcher.launch(job, ctx.recipe.train.device)
        result = TrainResult.model_validate(ctx.store.read_json(f"{out}/result.json"))
        result = result.model_copy(update={"reused": False, "key": key})
        loss = f"final loss {result.final_loss:.4f}, " if result.final_loss is not None else ""
        say(
            f"train: {result.steps} steps on {result.world_size} process(es), {result.device} "
            f"({ctx.recipe.train.launcher.type} launcher), {loss}{result.samples_per_s} samples/s"
        )
        # each run trains in its own folder, so overlapping retrains never write into one another;
        # the index entry is written atomically once the training is complete (the last one wins)
        ctx.store.write_json(f"cache/train/{key}.json", {"run_id": ctx.run_id, "result": result.model_dump(mode="json")})
    metrics = {"train/samples_per_s_mean": result.samples_per_s or 0.0, "train/steps": float(result.steps)}
    seen = sum(result.seen.values())
    for name, n in result.seen.items():  # what each source gave: the weights, as trained
        metrics |= {f"train/data/seen/{name}": float(n), f"train/data/seen_share/{name}": n / seen}
    tracking.log_metrics(run, metrics)
    if result.seen:
        say("train: samples seen per source: " + ", ".join(f"{name} {n:,} ({n / seen:.1%})" for name, n in result.seen.items()))
    history = ctx.store.read_json(f"{out}/history.json")
    if history:
        tracking.log_figure(run, loss_figure(history), "figures/loss_curve.png")
    tracking.set_tags(run, {"clipforge.checkpoint_uri": ctx.store.uri(result.checkpoint)})
    return result


def _followed(ctx: RunContext, out: str) -> FileWatcher:
    """Training as the Prefect run shows it: a progress artifact and lines, from the ``progress.json``
    that rank 0 writes on the store, wherever it runs (in this process, under torchrun, on a Ray
    cluster): the store is what every launcher's processes reach, the Prefect API may not be."""
    progress = Progress("train-progress", f"Training of run {ctx.run_id}", total=1)
    path = f"{out}/progress.json"
    launcher = ctx.recipe.train.launcher.type

    def seen(report: dict[str, Any]) -> None:
        line = (
            f"train: step {report['step']:,}/{report['total']:,} (epoch {report['epoch']}/{report['epochs']}), "
            f"loss {report['loss']:.4f}, {report['samples_per_s']:,.0f} samples/s on {report['world_size']} x "
            f"{report['device']} ({launcher} launcher)"
        )
        progress.update(report["step"], line, total=report["total"])

    return FileWatcher(lambda: ctx.store.read_json(path) if ctx.store.exists(path) else None, seen)
