"""What a run's stages and the lifecycle hooks share."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from clipforge.core.errors import ConfigError
from clipforge.core.stages import StageResults

if TYPE_CHECKING:
    import pluggy

    from clipforge.core.catalog import Catalog
    from clipforge.core.recipe import Recipe
    from clipforge.core.storage import Store


class RunPlugins(Protocol):
    """What a run uses of the plugin manager: the hooks it calls and the catalog of components.

    A protocol, not the manager's class: the manager loads the hookspecs, which name this context.
    """

    @property
    def hook(self) -> pluggy.HookRelay: ...

    @property
    def catalog(self) -> Catalog: ...


_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_run_id(run_id: str) -> str:
    """``run_id`` if it can name a folder under the store's ``runs/``; else a :class:`ConfigError` naming it."""
    if not _RUN_ID.match(run_id) or ".." in run_id:
        raise ConfigError(
            f"run id {run_id!r}: letters, digits, '_', '-' and '.' only (no '..', no '/'), at most 128, "
            "as clipforge makes them (20260101-120000-abc123)"
        )
    return run_id


@dataclass
class RunContext:
    """One retrain: its recipe, its folder on the store (``runs/<run_id>``), its MLflow run.

    ``state`` holds the typed result of each stage run so far (the curated shards, the trained
    model, the metrics, the registered version) and is saved as ``run.json`` in the run folder,
    so that a stage run on its own (``clipforge run --stage evaluate --run-id ...``) finds its inputs.
    """

    recipe: Recipe
    store: Store
    run_id: str
    plugins: RunPlugins
    mlflow_run_id: str | None = None
    state: StageResults = field(default_factory=StageResults)

    def __post_init__(self) -> None:
        check_run_id(self.run_id)

    @property
    def run_dir(self) -> str:
        return f"runs/{self.run_id}"

    def save_state(self) -> None:
        self.store.write_json(
            f"{self.run_dir}/run.json",
            {
                "run_id": self.run_id,
                "mlflow_run_id": self.mlflow_run_id,
                "recipe": self.recipe.as_dict(),
                "state": self.state.as_dict(),
            },
        )
