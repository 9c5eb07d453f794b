"""The stages of a retrain: one table, from which the run's results, the retrain's sequence, the
``--stage`` choices and the docs' stage list are derived.

A stage is a row: its name, the typed result it hands on (saved in the run's ``run.json``), and the
earlier stages whose results it needs. The retrain runs the rows in order; the stage flow of a row
(``clipforge.flows.<name>``) gets the results it needs, checked, as arguments.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel

from clipforge.core.errors import StageError
from clipforge.core.results import CurateResult, EvaluateResult, RegisterResult, TrainResult

R = TypeVar("R", bound=BaseModel)


@dataclass(frozen=True)
class Stage:
    """One stage: ``result`` is what it hands on, ``needs`` the stages whose results it takes, in order."""

    name: str
    result: type[BaseModel]
    needs: tuple[str, ...]
    does: str


#: Every stage, in the order a retrain runs them.
STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage("curate", CurateResult, (), "raw pairs -> curated shards and a manifest of every verdict"),
        Stage("train", TrainResult, ("curate",), "curated shards -> checkpoints and an open_clip model folder"),
        Stage("evaluate", EvaluateResult, ("train",), "the trained model -> metrics and figures"),
        Stage("register", RegisterResult, ("train", "evaluate"), "the evaluated model -> a registered version, maybe champion"),
    )
}


def stage_of(result_type: type[BaseModel]) -> Stage:
    """The stage that hands on ``result_type``."""
    for stage in STAGES.values():
        if stage.result is result_type:
            return stage
    raise KeyError(f"no stage hands on a {result_type.__name__}; the stages: {', '.join(STAGES)}")


class StageResults:
    """The results of a run's stages so far, by stage name; a stage not yet run has none.

    ``state.train`` is the train stage's :class:`~clipforge.TrainResult` (or None);
    ``state.get(TrainResult)`` is the same, typed.
    """

    def __init__(self, results: dict[str, BaseModel] | None = None) -> None:
        self._results: dict[str, BaseModel] = {}
        for name, result in (results or {}).items():
            self.set(name, result)

    def __getattr__(self, name: str) -> BaseModel | None:
        if name in STAGES:
            return self._results.get(name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}; the stages: {', '.join(STAGES)}")

    def __iter__(self) -> Iterator[tuple[str, BaseModel]]:
        """The results there are, in the stages' order."""
        return ((name, self._results[name]) for name in STAGES if name in self._results)

    def set(self, stage: str, result: BaseModel) -> None:
        expected = STAGES[stage].result
        if not isinstance(result, expected):
            raise TypeError(f"the {stage} stage hands on a {expected.__name__}, not a {type(result).__name__}")
        self._results[stage] = result

    def get(self, result_type: type[R]) -> R | None:
        found = self._results.get(stage_of(result_type).name)
        return found if isinstance(found, result_type) else None

    def done(self) -> list[str]:
        return [name for name, _ in self]

    def require(self, stage: str, needs: str, run_id: str) -> BaseModel:
        """The result of stage ``needs`` that ``stage`` takes, or a clear error saying which stage to run first."""
        result = self._results.get(needs)
        if result is None:
            raise StageError(
                f"{stage}: run {run_id} has no {needs} output yet; run the {needs} stage first "
                f"(clipforge run RECIPE --stage {needs} --run-id {run_id})"
            )
        return result

    def as_dict(self) -> dict[str, Any]:
        return {name: result.model_dump(mode="json") for name, result in self}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageResults:
        return cls({name: STAGES[name].result.model_validate(value) for name, value in data.items() if name in STAGES})


class RetrainResult(StageResults):
    """A retrain: its run id (its folder ``runs/<run_id>`` on the store), its MLflow run, each stage's result."""

    def __init__(self, results: StageResults, *, run_id: str, mlflow_run_id: str, store: str) -> None:
        super().__init__(dict(results))
        self.run_id, self.mlflow_run_id, self.store = run_id, mlflow_run_id, store

    def __repr__(self) -> str:
        return f"RetrainResult(run_id={self.run_id!r}, mlflow_run_id={self.mlflow_run_id!r}, stages={self.done()})"
