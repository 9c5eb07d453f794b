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
from clipforge import Pool, Sample, Verdict, resolve_model
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

    def _top(self, scores: list[float], pool: list[float]) -> list[Verdict]:
        everything = np.asarray([*pool, *scores], dtype=np.float64)
        n_keep = round(self.fraction * len(everything))
        order = np.argsort(-everything, kind="stable")
        keep = np.zeros(len(everything), dtype=bool)
        keep[order[:n_keep]] = True
        return [
            Verdict.kept(score=s) if k else Verdict.dropped(f"clip score not in the top {self.fraction:.0%}", score=s)
            for k, s in zip(keep[len(pool) :], scores)
        ]


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
