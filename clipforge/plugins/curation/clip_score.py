"""``clip-score``: keep pairs whose image-caption cosine, under a scoring model, reaches a threshold.

The scoring model is a registered model (``models:/NAME@champion``: the current champion
curates the next round's data) or an open_clip folder. LAION-5B kept ViT-B/32 scores >= 0.28.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

import clipforge
from clipforge.core.components import Sample, Verdict
from clipforge.plugins.curation.embedding import load_model, model_embeddings


class ClipScoreParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="models:/NAME@champion, models:/NAME/VERSION, or an open_clip folder")
    threshold: float = Field(ge=-1.0, le=1.0, description="smallest cosine kept")
    device: str = "cpu"


class ClipScore:
    def __init__(self, model: str, threshold: float, device: str = "cpu"):
        self.bundle = load_model(model, device)
        self.bundle.model.eval()
        self.threshold, self.device = threshold, device

    def __call__(self, samples: Sequence[Sample]) -> list[Verdict]:
        images, texts = model_embeddings(self.bundle, samples, self.device)
        scores = (images * texts).sum(axis=1)
        return [
            Verdict.kept(score=float(c)) if c >= self.threshold else Verdict.dropped("clip score below threshold", score=float(c))
            for c in scores
        ]


@clipforge.hookimpl
def register_curation_steps(register):
    register("clip-score", ClipScore, params=ClipScoreParams)
