"""The train flow: curated shards -> checkpoints and an open_clip model folder on the store."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from mlflow.tracking import MlflowClient
from prefect import flow

from clipforge.core.recipe import Recipe
from clipforge.core.storage import Store
from clipforge.engine.trainer import train
from clipforge.flows.common import open_context, require, stage
from clipforge.flows.figures import loss_figure
from clipforge.flows.tracking import log_figure, mlflow_run
from clipforge.registry import log_metrics


class _StepLogger:
    """Fires ``after_train_step`` every step; sends metrics to MLflow in batches, not one call a step.

    The batches are logged in the background (MLflow's asynchronous logging), so that a slow
    tracking server never holds up training; :meth:`close` waits until all of them are stored.
    """

    def __init__(self, ctx, run_id: str, every: int):
        self.ctx, self.run_id, self.every = ctx, run_id, every
        self.pending: list[tuple[int, dict[str, float]]] = []
        self.client = MlflowClient()
        self.operations: list[Any] = []

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        self.ctx.plugins.hook.after_train_step(context=self.ctx, step=step, metrics=metrics)
        self.pending.append((step, metrics))
        if len(self.pending) >= self.every:
            self.flush()

    def flush(self) -> None:
        from mlflow.entities import Metric

        from clipforge.registry import metric_key

        items = [
            Metric(metric_key(f"train/{k}"), float(v), 0, step)
            for step, metrics in self.pending
            for k, v in metrics.items()
        ]
        for i in range(0, len(items), 1000):
            self.operations.append(self.client.log_batch(self.run_id, metrics=items[i : i + 1000], synchronous=False))
        self.pending.clear()

    def close(self) -> None:
        """Send what is pending and wait until MLflow stored every batch (raising what failed)."""
        self.flush()
        for operation in self.operations:
            operation.wait()
        self.operations.clear()


def training_key(recipe: Recipe, curated: dict[str, Any]) -> str:
    """What a training's result depends on: the curated data's content, the model, the loss, the train settings."""
    spec = {
        "data": curated["content_hash"],
        "model": recipe.model.entry(),
        "loss": recipe.loss.entry(),
        "train": recipe.train.model_dump(mode="json", exclude={"log_every"}),  # how often to log changes nothing
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def finished_training(store: Store, key: str) -> dict[str, Any] | None:
    """The result of an earlier complete training with this key, if the store still holds it."""
    index = f"cache/train/{key}.json"
    if not store.exists(index):
        return None
    result = store.read_json(index)["result"]
    done = result["model"].rsplit("/", 1)[0]
    return result if store.exists(f"{done}/result.json") else None


@flow(name="train", log_prints=True)
def train_flow(recipe: dict[str, Any], run_id: str) -> dict[str, Any]:
    """Train the recipe's model on the run's curated data; resumes from the run's latest checkpoint.

    A training that already finished with the same data and settings (in an earlier, failed
    retrain for instance) is reused instead of redone: ``cache/train/<key>.json`` points at it.
    """
    ctx = open_context(recipe, run_id)
    curated = require(ctx, "train", "curate")
    with stage(ctx, "train") as result:
        run = mlflow_run(ctx)
        key = training_key(ctx.recipe, curated)
        out = f"{ctx.run_dir}/train"
        earlier = finished_training(ctx.store, key)
        if earlier and not ctx.store.exists(f"{out}/result.json"):
            summary = {**earlier, "reused": True}
            out = earlier["model"].rsplit("/", 1)[0]
            print(f"train: reusing the finished training {ctx.store.uri(out)} (same data and settings)")
            MlflowClient().set_tag(run, "clipforge.train_reused_from", ctx.store.uri(out))
        else:
            logger = _StepLogger(ctx, run, ctx.recipe.train.log_every)
            try:
                summary = train(ctx.recipe, ctx.plugins.catalog, ctx.store, out, curated["shards"], on_step=logger)
            finally:
                logger.close()
            summary = {**summary, "reused": False}
            # each run trains in its own folder, so overlapping retrains never write into one another;
            # the index entry is written atomically once the training is complete (the last one wins)
            ctx.store.write_json(f"cache/train/{key}.json", {"run_id": ctx.run_id, "result": summary})
        log_metrics(
            {"train/samples_per_s_mean": summary["samples_per_s"] or 0.0, "train/steps": float(summary["steps"])},
            run_id=run,
        )
        history = ctx.store.read_json(f"{out}/history.json")
        if history:
            log_figure(ctx, loss_figure(history), "figures/loss_curve.png")
        MlflowClient().set_tag(run, "clipforge.checkpoint_uri", ctx.store.uri(summary["checkpoint"]))
        result.update(summary, key=key)
    return ctx.state["train"]
