"""The train stage's work in one process: what a launcher (``Launcher.launch(job, device)``) runs in
every process it starts, on this machine or on others."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from clipforge.core.context import RunContext
from clipforge.core.plugins import get_plugin_manager
from clipforge.core.recipe import Recipe
from clipforge.core.results import Shard, SourceShards
from clipforge.core.stages import StageResults
from clipforge.core.storage import Store
from clipforge.engine.training.loop import train


class StepLog(Protocol):
    """Where rank 0 sends each step's metrics (a tracking server), made in the process that trains."""

    def __call__(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None:
        """Send what is pending and wait until it is stored."""


@dataclass(frozen=True)
class TrainJob:
    """The typed recipe (validated once, when the run started), the run's results so far, and where to
    train: it pickles to spawned processes and other machines. Every process trains its share; the
    engine calls ``on_step`` on rank 0 only, which fires ``after_train_step`` (of the plugins installed
    where it runs) and sends the step's metrics to ``step_log(log_every)``, if any.
    """

    recipe: Recipe
    run_id: str
    state: StageResults
    mlflow_run_id: str | None
    out: str
    shards: list[Shard]
    step_log: Callable[[int], StepLog] | None = None
    sources: list[SourceShards] | None = None  # drawn by weight: the mixture's sources and the replay

    def __call__(self) -> None:
        plugins = get_plugin_manager()
        storage = self.recipe.storage
        ctx = RunContext(
            recipe=self.recipe, store=Store(storage.root, storage.options), run_id=self.run_id, plugins=plugins,
            mlflow_run_id=self.mlflow_run_id, state=self.state,
        )  # fmt: skip
        log = self.step_log(self.recipe.train.log_every) if self.step_log else None

        def on_step(step: int, metrics: dict[str, float]) -> None:
            plugins.hook.after_train_step(context=ctx, step=step, metrics=metrics)
            if log is not None:
                log(step, metrics)

        try:
            train(self.recipe, plugins.catalog, ctx.store, self.out, self.shards, sources=self.sources, on_step=on_step)
        finally:
            if log is not None:
                log.close()
