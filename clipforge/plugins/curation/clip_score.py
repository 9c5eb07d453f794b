"""``clip-score``: DataComp's CLIP-score filtering, by an absolute threshold or keeping the top fraction.

The scoring model is a registered model (``models:/NAME@champion``: the current champion
curates the next round's data) or an open_clip folder. LAION-5B kept ViT-B/32 scores >= 0.28;
DataComp's best CLIP-score baseline kept the top 30 %.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

import clipforge
from clipforge.core.components import Sample, Verdict
from clipforge.plugins.curation.embedding import load_model, model_embeddings


class ClipScoreParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="models:/NAME@champion, models:/NAME/VERSION, or an open_clip folder")
    threshold: float | None = Field(None, ge=-1.0, le=1.0, description="smallest cosine kept")
    fraction: float | None = Field(None, gt=0.0, le=1.0, description="keep this top fraction of the scores")
    device: str = "cpu"

    @model_validator(mode="after")
    def _one_mode(self) -> ClipScoreParams:
        if (self.threshold is None) == (self.fraction is None):
            raise ValueError("give exactly one of 'threshold' (absolute) and 'fraction' (top fraction kept)")
        return self


class ClipScore:
    """Per sample: cosine of the image and caption embeddings against ``threshold``."""

    def __init__(self, model: str, threshold: float, device: str = "cpu"):
        self.bundle = load_model(model, device)
        self.threshold, self.device = threshold, device

    def scores(self, samples: Sequence[Sample]) -> np.ndarray:
        images, texts = model_embeddings(self.bundle, samples, self.device)
        return (images * texts).sum(axis=1)

    def __call__(self, samples: Sequence[Sample]) -> list[Verdict]:
        return [
            Verdict.kept(score=float(c)) if c >= self.threshold else Verdict.dropped("clip score below threshold", score=float(c))
            for c in self.scores(samples)
        ]


class ClipScoreTop(ClipScore):
    """Over the whole dataset: the top ``fraction`` of scores is kept (ties broken by order)."""

    def __init__(self, model: str, fraction: float, device: str = "cpu"):
        super().__init__(model, threshold=-1.0, device=device)
        self.fraction = fraction

    def features(self, samples: Sequence[Sample]) -> list[float]:
        return [float(c) for c in self.scores(samples)]

    def decide(self, keys: list[str], scores: list[float]) -> list[Verdict]:
        n_keep = int(round(self.fraction * len(scores)))
        order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
        keep = np.zeros(len(scores), dtype=bool)
        keep[order[:n_keep]] = True
        return [
            Verdict.kept(score=s) if k else Verdict.dropped(f"clip score not in the top {self.fraction:.0%}", score=s)
            for k, s in zip(keep, scores)
        ]


def create_clip_score(model: str, threshold: float | None = None, fraction: float | None = None, device: str = "cpu"):
    """CLIP-score filtering by a scoring model: an absolute threshold, or the top fraction."""
    return ClipScore(model, threshold, device) if fraction is None else ClipScoreTop(model, fraction, device)


@clipforge.hookimpl
def register_curation_steps(register):
    register("clip-score", create_clip_score, params=ClipScoreParams)
