"""``exact-duplicates`` and ``near-duplicates``: keep the first of each group of copies, drop the rest naming it."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

import clipforge
from clipforge.core.components import Sample, Verdict
from clipforge.plugins.curation.embedding import load_model, model_embeddings, thumbnails


class ExactParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    by: Literal["image", "image+caption"] = Field("image", description="same pixels, or same pixels and same caption")


class ExactDuplicates:
    """Same image (decoded pixels), or same image with the same normalised caption."""

    def __init__(self, by: str = "image"):
        self.by = by
        self.seen: dict[bytes, str] = {}  # 16-byte digests: a million samples cost ~100 MB with their keys

    def _digest(self, s: Sample) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{s.image.size}{s.image.mode}".encode())
        h.update(s.image.tobytes())
        if self.by == "image+caption":
            caption = s.caption if isinstance(s.caption, str) else " | ".join(s.caption)
            h.update(re.sub(r"\W+", " ", caption).strip().lower().encode())
        return h.digest()

    def __call__(self, samples: Sequence[Sample]) -> list[Verdict]:
        out = []
        for s in samples:
            digest = self._digest(s)
            first = self.seen.get(digest)
            if first is None:
                self.seen[digest] = s.key
                out.append(Verdict.kept())
            else:
                out.append(Verdict.dropped("exact duplicate", detail=f"of {first}"))
        return out


class NearParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    threshold: float = Field(0.97, gt=0, le=1, description="cosine similarity at which two images are one")
    embedding: Literal["thumbnail", "model"] = Field(
        "thumbnail", description="pixel thumbnails (no model), or the image embeddings of `model`"
    )
    model: str | None = Field(None, description="models:/NAME@champion or an open_clip folder, with embedding: model")
    device: str = "cpu"


class NearDuplicates:
    """Images whose embeddings have cosine >= threshold are one cluster; the first one seen is kept.

    An HNSW index (FAISS) over the kept images answers each query in about log(n), never n;
    its vectors are stored as float16 to keep memory near 2 bytes a dimension.
    """

    def __init__(self, threshold: float = 0.97, embedding: str = "thumbnail", model: str | None = None, device: str = "cpu"):
        if embedding == "model" and not model:
            raise clipforge.ConfigError("near-duplicates: embedding: model needs `model` (models:/NAME@champion or a folder)")
        self.threshold, self.device = threshold, device
        self.bundle = load_model(model, device) if embedding == "model" else None
        self.index = None
        self.keys: list[str] = []

    def embed(self, samples: Sequence[Sample]) -> np.ndarray:
        if self.bundle is None:
            return thumbnails([s.image for s in samples])
        return model_embeddings(self.bundle, samples, self.device)[0]

    def __call__(self, samples: Sequence[Sample]) -> list[Verdict]:
        import faiss

        emb = np.ascontiguousarray(self.embed(samples), dtype=np.float32)
        if self.index is None:
            self.index = faiss.IndexHNSWSQ(emb.shape[1], faiss.ScalarQuantizer.QT_fp16, 32, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efSearch = 64
        prior_sim, prior_idx = (
            self.index.search(emb, 1) if self.index.ntotal else (np.full((len(emb), 1), -1.0), np.full((len(emb), 1), -1))
        )
        within = emb @ emb.T  # one batch against itself: batch_size^2, not n^2
        verdicts: list[Verdict] = []
        kept_rows: list[int] = []
        for i, s in enumerate(samples):
            best = float(prior_sim[i, 0])
            twin = self.keys[prior_idx[i, 0]] if best >= self.threshold else None
            if twin is None and kept_rows:
                j = max(kept_rows, key=lambda r: within[i, r])
                if within[i, j] >= self.threshold:
                    best, twin = float(within[i, j]), samples[j].key
            if twin is not None:
                verdicts.append(Verdict.dropped("near duplicate", detail=f"of {twin}", similarity=best))
            else:
                kept_rows.append(i)
                verdicts.append(Verdict.kept(similarity=max(best, 0.0)))
        if kept_rows:
            self.index.add(emb[kept_rows])
            self.keys += [samples[r].key for r in kept_rows]
        return verdicts


@clipforge.hookimpl
def register_curation_steps(register):
    register("exact-duplicates", ExactDuplicates, params=ExactParams)
    register("near-duplicates", NearDuplicates, params=NearParams)
