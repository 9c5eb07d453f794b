"""``exact-duplicates`` and ``near-duplicates``: keep the first of each group of copies, drop the rest naming it.

Both decide over the whole dataset: each part computes a compact feature per sample (a 16-byte
digest, a float16 embedding), and one decision runs over all of them at the end. Against a pool
of curated data (``curation_pool``), a copy of a pool sample is dropped as a "duplicate of pool".
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

import clipforge
from clipforge import Pool, Sample, Verdict, resolve_model
from clipforge.plugins.curation.embedding import model_embeddings, thumbnails

#: The reason of a sample dropped because the pool curated against holds a copy of it.
POOL_DUPLICATE = "duplicate of pool"


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

    def features_signature(self) -> dict[str, Any]:
        return {"by": self.by}

    def decide(self, keys: list[str], digests: list[str]) -> list[Verdict]:
        return self.decide_against(keys, digests, Pool(keys=[], features=[], kept=[]))

    def decide_against(self, keys: list[str], digests: list[str], pool: Pool) -> list[Verdict]:
        in_pool: dict[str, int] = {}
        for i, (digest, kept) in enumerate(zip(pool.features, pool.kept)):
            if kept:
                in_pool.setdefault(digest, i)
        first: dict[str, str] = {}
        out = []
        for key, digest in zip(keys, digests):
            if digest in in_pool:
                out.append(Verdict.dropped(POOL_DUPLICATE, detail=f"duplicate of {pool.origin(in_pool[digest])}"))
            elif digest in first:
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
    device: str = "cpu"


class NearDuplicates:
    """Images whose embeddings have cosine >= threshold are linked; each connected group of links, of
    any size, keeps its first image in input order and drops the others, naming the one kept."""

    def __init__(
        self,
        threshold: float = 0.97,
        embedding: str = "thumbnail",
        model: str | None = None,
        device: str = "cpu",
        storage_options: dict[str, Any] | None = None,  # the recipe's, passed by the host
    ):
        if embedding == "model" and not model:
            raise clipforge.ConfigError("near-duplicates: embedding: model needs `model` (models:/NAME@champion or a folder)")
        self.threshold, self.device = threshold, device
        resolved = resolve_model(model, storage_options) if embedding == "model" and model else None
        self.bundle = resolved.load(device) if resolved else None
        # embeddings of two models live in different spaces: a pool's are only comparable from the same weights
        self.signature: dict[str, Any] = (
            {"embedding": "model", "model": resolved.pinned} if resolved else {"embedding": "thumbnail"}
        )

    def features(self, samples: Sequence[Sample]) -> np.ndarray:
        if self.bundle is None:
            return thumbnails([s.image for s in samples])
        return model_embeddings(self.bundle, samples, self.device)[0]

    def features_signature(self) -> dict[str, Any]:
        return self.signature

    def decide(self, keys: list[str], embeddings: np.ndarray) -> list[Verdict]:
        return self._decide(keys, embeddings, None, [])

    def decide_against(self, keys: list[str], embeddings: np.ndarray, pool: Pool) -> list[Verdict]:
        rows = [i for i, kept in enumerate(pool.kept) if kept]  # what the pool's curated data holds
        vectors = np.asarray(pool.features, dtype=np.float32)[rows] if rows else None
        return self._decide(keys, embeddings, vectors, [pool.origin(i) for i in rows])

    def _decide(self, keys: list[str], embeddings: np.ndarray, pool: np.ndarray | None, origins: list[str]) -> list[Verdict]:
        """The pool's vectors come first in the order: a group holding one of them keeps none of the new samples."""
        if len(keys) == 0:
            return []
        x = np.asarray(embeddings, dtype=np.float32).reshape(len(keys), -1)
        p = 0
        if pool is not None and len(pool):
            p = len(pool)
            x = np.concatenate([pool.reshape(p, -1), x])
        first, similarity = near_groups(x, self.threshold)
        out = []
        for i in range(p, len(x)):
            root = int(first[i])
            if root == i:
                out.append(Verdict.kept())
            elif root < p:
                out.append(
                    Verdict.dropped(POOL_DUPLICATE, detail=f"duplicate of {origins[root]}", similarity=float(similarity[i]))
                )
            else:
                out.append(Verdict.dropped("near duplicate", detail=f"of {keys[root - p]}", similarity=float(similarity[i])))
        return out


#: Below this many vectors every pair is compared exactly (a flat index), above an inverted-file index is searched.
EXACT_BELOW = 10_000


def near_groups(x: np.ndarray, threshold: float, *, exact_below: int = EXACT_BELOW) -> tuple[np.ndarray, np.ndarray]:
    """Group rows whose inner product is >= ``threshold``, transitively (the connected components of
    those links): for each row, the first row of its group, and its highest similarity to a linked row.

    Identical rows (an image copied as is) are grouped by their bytes first and searched once, so
    that a group of thousands of copies does not make millions of links.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(x)
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows = x.view(np.dtype((np.void, x.dtype.itemsize * x.shape[1]))).ravel()
    _, unique, inverse = np.unique(rows, return_index=True, return_inverse=True)
    inverse = inverse.ravel()
    i, j, sims = near_pairs(x[unique], threshold, exact_below=exact_below)
    copies = np.flatnonzero(unique[inverse] != np.arange(n))
    a = np.concatenate([unique[i], copies])
    b = np.concatenate([unique[j], unique[inverse[copies]]])
    s = np.concatenate([sims, np.ones(len(copies), dtype=np.float32)])
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    first = np.full(component.max() + 1, n, dtype=np.int64)
    np.minimum.at(first, component, np.arange(n))
    similarity = np.zeros(n, dtype=np.float32)
    np.maximum.at(similarity, a, s)
    np.maximum.at(similarity, b, s)
    return first[component], similarity


def near_pairs(
    x: np.ndarray, threshold: float, *, exact_below: int = EXACT_BELOW, nprobe: int = 8
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair ``i < j`` of rows with inner product >= ``threshold``, and that product: a range
    search on an inverted-file index, never a comparison of all pairs beyond ``exact_below`` rows.

    The index partitions the rows into ~3 sqrt(n) lists around spherical k-means centroids (FAISS);
    each row is compared with the rows of the ``nprobe`` lists whose centroids are nearest to it,
    where a near copy of it falls. Each list is searched for all the rows that probe it at once, as
    one matrix product (the products are exact float32, so the index only chooses what is compared):
    FAISS's own ``range_search`` scans a list one query at a time, several times slower here.
    """
    n, d = x.shape
    x = np.ascontiguousarray(x, dtype=np.float32)
    if n < max(exact_below, 2):
        return _pairs_in(x, threshold, [(np.arange(n), np.arange(n))])
    import faiss

    nlist = int(min(3 * np.sqrt(n), n // 25))
    kmeans = faiss.Kmeans(d, nlist, niter=5, spherical=True, seed=0, min_points_per_centroid=1, max_points_per_centroid=10)
    kmeans.train(x[np.random.default_rng(0).choice(n, size=min(n, nlist * 10), replace=False)])
    centroids = faiss.IndexFlatIP(d)
    centroids.add(np.asarray(kmeans.centroids))
    nprobe = min(nprobe, nlist)
    _, probes = centroids.search(x, nprobe)  # (n, nprobe) lists nearest to each row, its own list first
    home = probes[:, 0]
    members = np.argsort(home, kind="stable")
    member_ends = np.searchsorted(home[members], np.arange(nlist + 1))
    probing = np.argsort(probes.ravel(), kind="stable")
    probe_ends = np.searchsorted(probes.ravel()[probing], np.arange(nlist + 1))
    blocks = (
        (probing[probe_ends[k] : probe_ends[k + 1]] // nprobe, members[member_ends[k] : member_ends[k + 1]]) for k in range(nlist)
    )
    return _pairs_in(x, threshold, blocks)


def _pairs_in(
    x: np.ndarray, threshold: float, blocks: Iterable[tuple[np.ndarray, np.ndarray]], chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pairs at or above ``threshold`` between each block's queries and its rows, each pair once."""
    n = len(x)
    found, products = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.float32)]
    for queries, rows in blocks:
        if not len(rows):
            continue
        for start in range(0, len(queries), chunk):  # bounds the product's memory on a list of many copies
            q = queries[start : start + chunk]
            sims = x[q] @ x[rows].T
            a, b = np.nonzero(sims >= threshold)
            low, high = np.minimum(q[a], rows[b]).astype(np.int64), np.maximum(q[a], rows[b]).astype(np.int64)
            found.append((low * n + high)[low != high])
            products.append(sims[a, b][low != high])
    pairs, first = np.unique(np.concatenate(found), return_index=True)  # a pair found from both of its ends counts once
    return pairs // n, pairs % n, np.concatenate(products)[first]


@clipforge.hookimpl
def register_curation_steps(register):
    register("exact-duplicates", ExactDuplicates, params=ExactParams)
    register("near-duplicates", NearDuplicates, params=NearParams)
