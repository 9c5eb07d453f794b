"""Phase 2, once: the whole-dataset steps decide over every part's survivors, from their features alone
(and, with a pool to curate against, from the pool's stored features too)."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel

from clipforge.core.components import DecidesAgainstPool, DecidesInPartitions, Verdict
from clipforge.core.errors import StageError
from clipforge.core.recipe import Recipe
from clipforge.core.results import StepCounts
from clipforge.core.storage import Store
from clipforge.engine.curation.layout import DECODE_STEP, REDUCED, SCORES, survivor_features, survivor_keys, write_table
from clipforge.engine.curation.partitioned import Mapper, decide_partitioned, partitions_for
from clipforge.engine.curation.parts import PartResult
from clipforge.engine.curation.plan import Steps

if TYPE_CHECKING:
    from clipforge.engine.curation.pool import PoolChain


class Drop(BaseModel):
    """A survivor of the parts that a whole-dataset step dropped; ``position`` orders every survivor of every part."""

    position: int
    key: str
    step: str
    reason: str
    detail: str = ""


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


def reduce(
    steps: Steps,
    store: Store,
    out: str,
    parts: list[PartResult],
    pool: PoolChain | None = None,
    *,
    recipe: Recipe | None = None,
    mapper: Mapper = map,
) -> Reduced:
    """The whole-dataset steps over every part's survivors, in order (a key in two parts: the later goes).

    With a ``pool``, a step that can decide against one (:class:`~clipforge.core.components.DecidesAgainstPool`)
    gets the pool's stored features for it; the others decide over the new data alone.

    With the ``recipe``'s ``parallel.reduce_partitions`` above 1, a step that decides in partitions
    (:class:`~clipforge.core.components.DecidesInPartitions`) does so as tasks of ``mapper``, reading the
    features from the store; the verdicts are the same.
    """
    if store.exists(f"{out}/{REDUCED}"):
        return Reduced.model_validate(store.read_json(f"{out}/{REDUCED}"))
    keys = survivor_keys(store, out, len(parts))
    drops: dict[int, Drop] = {}
    seen: set[str] = set()
    for position, key in enumerate(keys):
        if key in seen:
            drops[position] = Drop(position=position, key=key, step=DECODE_STEP, reason="duplicate key")
        seen.add(key)
    alive = np.ones(len(keys), dtype=bool)
    alive[list(drops)] = False
    funnel = {}
    scores: dict[str, np.ndarray] = {}
    partitions = partitions_for(recipe.parallel.reduce_partitions, len(keys)) if recipe is not None else 1
    for label, step in steps.whole:
        index = np.flatnonzero(alive)
        if partitions > 1 and recipe is not None and isinstance(step, DecidesInPartitions):
            sizes = [p.kept for p in parts]
            verdicts = decide_partitioned(step, label, steps.types[label], recipe, store, out, sizes, keys, alive, partitions,
                                          mapper, pool)  # fmt: skip
        else:
            verdicts = _decide_at_once(step, label, steps, store, out, len(parts), [keys[j] for j in index], index, pool)
        if len(verdicts) != len(index):
            raise StageError(f"curation step {label!r} returned {len(verdicts)} verdicts for {len(index)} samples")
        reasons: Counter[str] = Counter()
        for j, verdict in zip(index, verdicts):
            for name, value in verdict.scores.items():
                scores.setdefault(f"{label}/{name}", np.full(len(keys), np.nan))[j] = value
            if not verdict.keep:
                alive[j] = False
                reasons[verdict.reason or "dropped"] += 1
                drops[int(j)] = Drop(position=int(j), key=keys[j], step=label, reason=verdict.reason or "dropped",
                                     detail=verdict.detail)  # fmt: skip
        dropped = sum(reasons.values())
        funnel[label] = StepCounts(seen=len(index), kept=len(index) - dropped, dropped=dropped, reasons=dict(reasons))
    _write_scores(store, f"{out}/{SCORES}", keys, scores)
    reduced = Reduced(drops=[drops[p] for p in sorted(drops)], funnel=funnel, kept=int(alive.sum()))
    store.write_json(f"{out}/{REDUCED}", reduced.model_dump(mode="json"))  # last: marks the phase complete
    return reduced


def _decide_at_once(step: Any, label: str, steps: Steps, store: Store, out: str, n_parts: int, chosen: list[str],
                    index: np.ndarray, pool: PoolChain | None) -> list[Verdict]:  # fmt: skip
    """One decision over every survivor's features, in this process."""
    features = survivor_features(store, out, n_parts, label, index)
    if pool is not None and isinstance(step, DecidesAgainstPool):
        return list(step.decide_against(chosen, features, pool.view(steps.types[label], step)))
    return list(step.decide(chosen, features))


def _write_scores(store: Store, rel: str, keys: list[str], scores: dict[str, np.ndarray]) -> None:
    import pyarrow as pa

    columns = {name: pa.array(scores[name], mask=np.isnan(scores[name])) for name in sorted(scores)}
    write_table(store, rel, pa.table({"key": pa.array(keys, type=pa.string()), **columns}))
