"""``clip-score``: DataComp's CLIP-score filtering, by an absolute threshold or keeping the top fraction.

The scoring model is any model reference (``models:/NAME@champion``: the current champion
curates the next round's data; a folder, a store URI, a checkpoint). LAION-5B kept ViT-B/32 scores >= 0.28;
DataComp's best CLIP-score baseline kept the top 30 %.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

import clipforge
from clipforge import Block, Pool, Sample, Verdict, resolve_model
from clipforge.plugins.curation.embedding import model_embeddings


class ClipScoreParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(
        description="the scoring model: models:/NAME@champion, models:/NAME/VERSION, runs:/..., a folder, s3://..., a checkpoint"
    )
    threshold: float | None = Field(None, ge=-1.0, le=1.0, description="smallest cosine kept")
    fraction: float | None = Field(None, gt=0.0, le=1.0, description="keep this top fraction of the scores")
    device: str = "cpu"

    @model_validator(mode="after")
    def _one_mode(self) -> ClipScoreParams:
        if (self.threshold is None) == (self.fraction is None):
            raise ValueError("give exactly one of 'threshold' (absolute) and 'fraction' (top fraction kept)")
        return self

    def whole_dataset(self) -> bool:
        """A top fraction is decided over the whole dataset; a threshold sample by sample."""
        return self.fraction is not None


class _Scorer:
    """Cosines of the image and caption embeddings of a scoring model."""

    def __init__(self, model: str, device: str, storage_options: dict[str, Any] | None) -> None:
        self.bundle, self.device = resolve_model(model, storage_options).load(device), device

    def scores(self, samples: Sequence[Sample]) -> np.ndarray:
        images, texts = model_embeddings(self.bundle, samples, self.device)
        return (images * texts).sum(axis=1)


class ClipScore(_Scorer):
    """Per sample: the cosine against ``threshold``."""

    def __init__(self, model: str, threshold: float, device: str = "cpu", storage_options: dict[str, Any] | None = None):
        super().__init__(model, device, storage_options)
        self.threshold = threshold

    def __call__(self, samples: Sequence[Sample]) -> list[Verdict]:
        return [
            Verdict.kept(score=float(c)) if c >= self.threshold else Verdict.dropped("clip score below threshold", score=float(c))
            for c in self.scores(samples)
        ]


class ClipScoreTop(_Scorer):
    """Over the whole dataset: the top ``fraction`` of scores is kept (ties broken by order); against a
    pool, the top fraction of the pool's scores and the new ones together."""

    def __init__(self, model: str, fraction: float, device: str = "cpu", storage_options: dict[str, Any] | None = None):
        super().__init__(model, device, storage_options)
        self.model, self.fraction = model, fraction

    def features(self, samples: Sequence[Sample]) -> list[float]:
        return [float(c) for c in self.scores(samples)]

    def features_signature(self) -> dict[str, Any]:
        # the reference as written: with models:/NAME@champion each round's scores come from that round's
        # champion, and the pool's scores are the ones its own curation computed
        return {"model": self.model}

    def decide(self, keys: list[str], scores: list[float]) -> list[Verdict]:
        return self._top(scores, [])

    def decide_against(self, keys: list[str], scores: list[float], pool: Pool) -> list[Verdict]:
        """The top fraction of the pool's scores and the new ones together (the pool's first on ties)."""
        return self._top(scores, list(pool.features) if pool.statistics else [])

    # -- in partitions (clipforge.DecidesInPartitions): the exact k-th score by a radix select ---------
    # Each score becomes a 64-bit key in the same order; the surveys are histograms of 16 bits of the
    # keys that share the bits found so far, refined until the bin holding the k-th key is kept whole
    # or the key is known; then the ties at that key are kept first by position, as the stable sort does.

    def survey(self, plan: Any, block: Block) -> Any:
        if block.pool and not block.statistics:
            return {"first": block.first, "n": 0, "digits": np.zeros(0, np.int64), "counts": np.zeros(0, np.int64), "ties": 0}
        u = _sortable(block.features)
        survey: dict[str, Any] = {"first": block.first, "n": len(u)}
        if plan is not None and "key" in plan:
            survey["ties"] = int((u == np.uint64(plan["key"])).sum())
            return survey
        bits = plan["bits"] if plan else 0
        if plan and bits:
            u = u[(u >> np.uint64(64 - bits)) == np.uint64(plan["prefix"])]
        survey["digits"], survey["counts"] = np.unique((u >> np.uint64(48 - bits)) & np.uint64(0xFFFF), return_counts=True)
        return survey

    def plan(self, plan: Any, surveys: list[Any], partitions: int) -> tuple[Any, bool]:
        if plan is not None and "key" in plan:  # the ties at the k-th key, kept first by position
            quota: dict[int, int] = {}
            left = plan["k"]
            for s in sorted(surveys, key=lambda s: s["first"]):
                take = min(left, s["ties"])
                quota[s["first"]] = quota.get(s["first"], 0) + take  # an empty block shares its first with the next
                left -= take
            return {"above": plan["key"], "tie": plan["key"], "quota": quota}, True
        if plan is None:
            n = sum(s["n"] for s in surveys)
            plan = {"bits": 0, "prefix": 0, "k": round(self.fraction * n)}
            if plan["k"] in (0, n):  # none or all kept: no key to find
                return {"above": -1 if plan["k"] else 1 << 64, "tie": None, "quota": {}}, True
        counts = np.zeros(1 << 16, dtype=np.int64)
        for s in surveys:
            np.add.at(counts, s["digits"].astype(np.int64), s["counts"])
        above = np.cumsum(counts[::-1])[::-1] - counts  # keys of a higher digit than each
        digit = int(np.flatnonzero((above < plan["k"]) & (above + counts >= plan["k"]))[-1])
        k, bits, prefix = plan["k"] - int(above[digit]), plan["bits"] + 16, (plan["prefix"] << 16) | digit
        if k == counts[digit]:  # the whole bin is kept: every key from its lowest one
            return {"above": (prefix << (64 - bits)) - 1, "tie": None, "quota": {}}, True
        if bits == 64:
            return {"key": prefix, "k": k}, False
        return {"bits": bits, "prefix": prefix, "k": k}, False

    def route(self, plan: Any, block: Block) -> dict[int, dict[str, Any]]:
        return {}

    def link(self, plan: Any, shares: list[dict[str, Any]]) -> None:
        return None

    def settle(self, plan: Any, links: list[Any], name: Any) -> Any:
        return plan

    def decide_block(self, plan: Any, block: Block) -> list[Verdict]:
        u = _sortable(block.features)
        above = plan["above"]  # may lie outside 64 bits: all kept, or none
        keep = np.full(len(u), above < 0) if not 0 <= above < (1 << 64) else u > np.uint64(above)
        if plan["tie"] is not None:
            ties = np.flatnonzero(u == plan["tie"])[: plan["quota"].get(block.first, 0)]
            keep[ties] = True
        return self._verdicts(keep, list(block.features))

    def _top(self, scores: list[float], pool: list[float]) -> list[Verdict]:
        everything = np.asarray([*pool, *scores], dtype=np.float64)
        n_keep = round(self.fraction * len(everything))
        order = np.argsort(-everything, kind="stable")
        keep = np.zeros(len(everything), dtype=bool)
        keep[order[:n_keep]] = True
        return self._verdicts(keep[len(pool) :], scores)

    def _verdicts(self, keep: np.ndarray, scores: list[float]) -> list[Verdict]:
        return [
            Verdict.kept(score=s) if k else Verdict.dropped(f"clip score not in the top {self.fraction:.0%}", score=s)
            for k, s in zip(keep, scores)
        ]


def _sortable(scores: Any) -> np.ndarray:
    """Each score as a 64-bit key in the order the top fraction's sort puts them (NaN lowest, -0.0 as 0.0)."""
    x = np.asarray(scores, dtype=np.float64).reshape(-1) + 0.0
    bits = x.view(np.uint64)
    u = np.where(bits >> np.uint64(63), ~bits, bits | np.uint64(1 << 63))
    u[np.isnan(x)] = 0
    return u


def create_clip_score(
    model: str,
    threshold: float | None = None,
    fraction: float | None = None,
    device: str = "cpu",
    storage_options: dict[str, Any] | None = None,
) -> ClipScore | ClipScoreTop:
    """CLIP-score filtering by a scoring model: an absolute threshold, or the top fraction.

    ``storage_options``, the recipe's ``storage.options``, are passed by the host: they open a
    model on the recipe's store (``s3://...`` on its endpoint).
    """
    if fraction is not None:
        return ClipScoreTop(model, fraction, device, storage_options)
    assert threshold is not None  # ClipScoreParams asks for exactly one of the two
    return ClipScore(model, threshold, device, storage_options)


@clipforge.hookimpl
def register_curation_steps(register):
    register("clip-score", create_clip_score, params=ClipScoreParams)
