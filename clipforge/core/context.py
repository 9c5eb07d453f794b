"""What a run's stages and the lifecycle hooks share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from clipforge.core.results import StageResults

if TYPE_CHECKING:
    from clipforge.core.plugins import PluginManager
    from clipforge.core.recipe import Recipe
    from clipforge.core.storage import Store


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
    plugins: PluginManager
    mlflow_run_id: str | None = None
    state: StageResults = field(default_factory=StageResults)

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
