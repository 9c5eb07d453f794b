"""Phase 2, once: the whole-dataset steps decide over every part's survivors, from their features alone."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from clipforge.core.results import StepCounts
from clipforge.core.storage import Store
from clipforge.engine.curation.parts import PartResult, load_features
from clipforge.engine.curation.plan import DECODE_STEP, Steps, part_dir


class Drop(BaseModel):
    """A survivor of the parts that a whole-dataset step dropped; ``position`` orders every survivor of every part."""

    position: int
    key: str
    step: str
    reason: str
    detail: str = ""
    scores: dict[str, float] = Field(default_factory=dict)


class Reduced(BaseModel):
    """The whole-dataset decisions (``reduce.json``): the drops in order, each step's counts, the survivors left."""

    drops: list[Drop]
    funnel: dict[str, StepCounts]
    kept: int

    def of_part(self, first: int, count: int) -> list[Drop]:
        """The drops among the survivors at positions ``first`` to ``first + count``: one part's."""
        return [d for d in self.drops if first <= d.position < first + count]


def first_positions(parts: list[PartResult]) -> list[int]:
    """Where each part's survivors start in the order of every survivor."""
    return [int(x) for x in np.cumsum([0] + [p.kept for p in parts[:-1]])]


def reduce(steps: Steps, store: Store, out: str, parts: list[PartResult]) -> Reduced:
    """The whole-dataset steps over every part's survivors, in order (a key in two parts: the later goes)."""
    if store.exists(f"{out}/reduce.json"):
        return Reduced.model_validate(store.read_json(f"{out}/reduce.json"))
    keys = _survivor_keys(store, out, len(parts))
    drops: dict[int, Drop] = {}
    seen: set[str] = set()
    for position, key in enumerate(keys):
        if key in seen:
            drops[position] = Drop(position=position, key=key, step=DECODE_STEP, reason="duplicate key")
        seen.add(key)
    alive = np.ones(len(keys), dtype=bool)
    alive[list(drops)] = False
    funnel = {}
    for label, step in steps.whole:
        index = np.flatnonzero(alive)
        verdicts = list(step.decide([keys[j] for j in index], _features_of(store, out, len(parts), label, index)))
        reasons: Counter[str] = Counter()
        for j, verdict in zip(index, verdicts):
            if not verdict.keep:
                alive[j] = False
                reasons[verdict.reason or "dropped"] += 1
                drops[int(j)] = Drop(position=int(j), key=keys[j], step=label, reason=verdict.reason or "dropped",
                                     detail=verdict.detail, scores=verdict.scores)  # fmt: skip
        dropped = sum(reasons.values())
        funnel[label] = StepCounts(seen=len(index), kept=len(index) - dropped, dropped=dropped, reasons=dict(reasons))
    reduced = Reduced(drops=[drops[p] for p in sorted(drops)], funnel=funnel, kept=int(alive.sum()))
    store.write_json(f"{out}/reduce.json", reduced.model_dump(mode="json"))
    return reduced


def _survivor_keys(store: Store, out: str, n_parts: int) -> list[str]:
    import pyarrow.parquet as pq

    keys: list[str] = []
    for i in range(n_parts):
        table = pq.read_table(store.open(f"{part_dir(out, i)}/manifest.parquet"), columns=["key", "kept"])
        keys += [k for k, kept in zip(table.column("key").to_pylist(), table.column("kept").to_pylist()) if kept]
    return keys


def _features_of(store: Store, out: str, n_parts: int, label: str, index: np.ndarray) -> Any:
    """The features step ``label`` computed for the survivors at positions ``index``: an array or a list."""
    features: list[Any] = []
    for i in range(n_parts):
        values = load_features(store, f"{part_dir(out, i)}/features-{label}")
        features.extend(values if not isinstance(values, np.ndarray) else list(values))
    chosen = [features[j] for j in index]
    if chosen and isinstance(chosen[0], np.ndarray):
        return np.stack(chosen).astype(np.float32)
    return chosen
