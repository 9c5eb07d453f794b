"""``exact-duplicates`` and ``near-duplicates``: keep the first of each group of copies, drop the rest naming it.

Both decide over the whole dataset: each part computes a compact feature per sample (a 16-byte
digest, a float16 embedding), and one decision runs over all of them at the end.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

import clipforge
from clipforge.core.components import Sample, Verdict
from clipforge.core.resolver import resolve_model
from clipforge.plugins.curation.embedding import model_embeddings, thumbnails


class ExactParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    by: Literal["image", "image+caption"] = Field("image", description="same pixels, or same pixels and same caption")


class ExactDuplicates:
    """Same image (decoded pixels), or same image with the same normalised caption."""

    def __init__(self, by: str = "image"):
        self.by = by

    def features(self, samples: Sequence[Sample]) -> list[str]:
        out = []
        for s in samples:
            h = hashlib.blake2b(digest_size=16)
            h.update(f"{s.image.size}{s.image.mode}".encode())
            h.update(s.image.tobytes())
            if self.by == "image+caption":
                caption = " | ".join(s.captions)
                h.update(re.sub(r"\W+", " ", caption).strip().lower().encode())
            out.append(h.hexdigest())
        return out

    def decide(self, keys: list[str], digests: list[str]) -> list[Verdict]:
        first: dict[str, str] = {}
        out = []
        for key, digest in zip(keys, digests):
            if digest in first:
                out.append(Verdict.dropped("exact duplicate", detail=f"of {first[digest]}"))
            else:
                first[digest] = key
                out.append(Verdict.kept())
        return out


class NearParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    threshold: float = Field(0.97, gt=0, le=1, description="cosine similarity at which two images are one")
    embedding: Literal["thumbnail", "model"] = Field(
        "thumbnail", description="pixel thumbnails (no model), or the image embeddings of `model`"
    )
    model: str | None = Field(
        None, description="the embedding model, with embedding: model: models:/NAME@champion, a folder, s3://..., a checkpoint"
    )
    neighbours: int = Field(8, ge=1, le=256, description="neighbours looked at per image")
    device: str = "cpu"


class NearDuplicates:
    """Images whose embeddings have cosine >= threshold are one cluster; the first one in order is kept."""

    def __init__(self, threshold: float = 0.97, embedding: str = "thumbnail", model: str | None = None,
                 neighbours: int = 8, device: str = "cpu"):  # fmt: skip
        if embedding == "model" and not model:
            raise clipforge.ConfigError("near-duplicates: embedding: model needs `model` (models:/NAME@champion or a folder)")
        self.threshold, self.neighbours, self.device = threshold, neighbours, device
        self.bundle = resolve_model(model).load(device) if embedding == "model" and model else None

    def features(self, samples: Sequence[Sample]) -> np.ndarray:
        if self.bundle is None:
            return thumbnails([s.image for s in samples])
        return model_embeddings(self.bundle, samples, self.device)[0]

    def decide(self, keys: list[str], embeddings: np.ndarray) -> list[Verdict]:
        if len(keys) == 0:
            return []
        sims, ids = near_neighbours(np.ascontiguousarray(embeddings, dtype=np.float32), self.neighbours + 1)
        order = np.arange(len(keys))[:, None]
        close = (sims >= self.threshold) & (ids >= 0) & (ids < order)  # an earlier image within the threshold
        out = [Verdict.kept() for _ in keys]
        kept = np.ones(len(keys), dtype=bool)
        for i in np.flatnonzero(close.any(axis=1)):  # only these can be duplicates: a loop over few rows
            # the first earlier image within the threshold that was itself kept: clusters keep their first member
            match = next(((s, j) for s, j, c in zip(sims[i], ids[i], close[i]) if c and kept[j]), None)
            if match is not None:
                kept[i] = False
                out[i] = Verdict.dropped("near duplicate", detail=f"of {keys[match[1]]}", similarity=float(match[0]))
        return out


def near_neighbours(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest rows (inner product) of every row: an inverted-file index (FAISS), never all pairs.

    With ~3 sqrt(n) lists and 6 probed per query, each query scans about 2 sqrt(n) vectors, and a
    near copy falls in its original's list or a neighbouring one. The lists hold the vectors in
    float16, which loses nothing: the parts store the embeddings in float16.
    """
    import faiss

    n, d = x.shape
    k = min(k, n)
    nlist = int(min(3 * np.sqrt(n), n // 25))
    index: Any
    if nlist <= 1:
        index = faiss.IndexFlatIP(d)
    else:
        index = faiss.IndexIVFScalarQuantizer(
            faiss.IndexFlatIP(d), d, nlist, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
        )
        index.by_residual = False  # the vectors themselves, not their offsets from a centroid: exact in float16
        index.cp.min_points_per_centroid = 25  # coarse centroids suffice to route near copies together
        index.cp.niter = 10
        rng = np.random.default_rng(0)
        index.train(x[rng.choice(n, size=min(n, nlist * 25), replace=False)])
        index.nprobe = min(6, nlist)
    index.add(x)
    return index.search(x, k)


@clipforge.hookimpl
def register_curation_steps(register):
    register("exact-duplicates", ExactDuplicates, params=ExactParams)
    register("near-duplicates", NearDuplicates, params=NearParams)
