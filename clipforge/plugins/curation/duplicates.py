"""``exact-duplicates`` and ``near-duplicates``: keep the first of each group of copies, drop the rest naming it.

Both decide over the whole dataset: each part computes a compact feature per sample (a 16-byte
digest, a float16 embedding), and one decision runs over all of them at the end. Against a pool
of curated data (``curation_pool``), a copy of a pool sample is dropped as a "duplicate of pool".
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

import clipforge
from clipforge import Block, Pool, Sample, Verdict, resolve_model
from clipforge.plugins.curation.embedding import model_embeddings, thumbnails

#: The reason of a sample dropped because the pool curated against holds a copy of it.
POOL_DUPLICATE = "duplicate of pool"

log = logging.getLogger(__name__)


class Groups:
    """The partitioned decision both duplicate steps share: links ``(a, b)`` between positions found
    per partition, settled globally into groups (connected components), each of which keeps its first
    position; a row whose group starts in the pool is a duplicate of the pool."""

    reason = "exact duplicate"

    def survey(self, plan: Any, block: Block) -> Any:
        return {"pool": block.pool, "first": block.first, "end": block.first + len(block.keys), **self._survey(plan, block)}

    def _survey(self, plan: Any, block: Block) -> dict[str, Any]:
        return {}

    def _bounds(self, surveys: list[Any]) -> dict[str, int]:
        """Where the new data's positions start, and how many positions there are."""
        end = max((s["end"] for s in surveys), default=0)
        return {"new_start": min((s["first"] for s in surveys if not s["pool"]), default=end), "end": end}

    def _rows(self, block: Block) -> np.ndarray:
        """The block's rows that can be a group's: a pool's kept ones, every one of the new data."""
        return np.arange(len(block.keys)) if block.kept is None else np.flatnonzero(np.asarray(block.kept, dtype=bool))

    def settle(self, plan: Any, links: list[Any], name: Callable[[int], str]) -> Any:
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        a = np.concatenate([np.zeros(0, dtype=np.int64), *(x[0] for x in links)])
        b = np.concatenate([np.zeros(0, dtype=np.int64), *(x[1] for x in links)])
        s = np.concatenate([np.zeros(0, dtype=np.float32), *(x[2] for x in links)])
        nodes = np.unique(np.concatenate([a, b]))
        ia, ib = np.searchsorted(nodes, a), np.searchsorted(nodes, b)
        graph = coo_matrix((np.ones(len(a), dtype=np.int8), (ia, ib)), shape=(len(nodes), len(nodes)))
        _, component = connected_components(graph, directed=False) if len(nodes) else (0, np.zeros(0, dtype=np.int64))
        first = np.full(int(component.max()) + 1 if len(nodes) else 0, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(first, component, nodes)
        similarity = np.zeros(len(nodes), dtype=np.float32)
        np.maximum.at(similarity, ia, s)  # a pair found in two partitions counts once: the highest product
        np.maximum.at(similarity, ib, s)
        firsts = first[component]
        names = {int(f): name(int(f)) for f in np.unique(firsts[firsts != nodes])}
        return {**plan, "nodes": nodes, "firsts": firsts, "similarity": similarity, "names": names}

    def decide_block(self, plan: Any, block: Block) -> list[Verdict]:
        positions = block.first + np.arange(len(block.keys))
        nodes, firsts = plan["nodes"], plan["firsts"]
        at = np.minimum(np.searchsorted(nodes, positions), max(len(nodes) - 1, 0))
        out = []
        for i, position in enumerate(positions.tolist()):
            j = int(at[i])
            if not len(nodes) or nodes[j] != position or firsts[j] == position:
                out.append(Verdict.kept())
                continue
            first = int(firsts[j])
            scores = self._scores(plan, j)
            if first < plan["new_start"]:
                out.append(Verdict.dropped(POOL_DUPLICATE, detail=f"duplicate of {plan['names'][first]}", **scores))
            else:
                out.append(Verdict.dropped(self.reason, detail=f"of {plan['names'][first]}", **scores))
        return out

    def _scores(self, plan: Any, j: int) -> dict[str, float]:
        return {}


class ExactParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    by: Literal["image", "image+caption"] = Field("image", description="same pixels, or same pixels and same caption")


class ExactDuplicates(Groups):
    """Same image (decoded pixels), or same image with the same normalised caption.

    In partitions (:class:`clipforge.DecidesInPartitions`): each digest goes to one partition, by its
    value; a partition links each copy to the first of its digest, so every group is whole in one.
    """

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

    def plan(self, plan: Any, surveys: list[Any], partitions: int) -> tuple[Any, bool]:
        return {"partitions": partitions, **self._bounds(surveys)}, True

    def route(self, plan: Any, block: Block) -> dict[int, dict[str, Any]]:
        rows = self._rows(block)
        digests = np.array([block.features[i] for i in rows], dtype="S32")
        home = np.array([int(d[:8], 16) % plan["partitions"] for d in digests], dtype=np.int64)
        return {int(p): {"position": block.first + rows[home == p], "digest": digests[home == p]} for p in np.unique(home)}

    def link(self, plan: Any, shares: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        position = np.concatenate([s["position"] for s in shares]).astype(np.int64)
        digest = np.concatenate([s["digest"] for s in shares])
        order = np.lexsort((position, digest))
        position, digest = position[order], digest[order]
        starts = np.flatnonzero(np.r_[True, digest[1:] != digest[:-1]])
        first = position[starts][np.cumsum(np.r_[True, digest[1:] != digest[:-1]]) - 1]
        copy = position != first
        return first[copy], position[copy], np.ones(int(copy.sum()), dtype=np.float32)


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
    search: Literal["exact", "index"] = Field(
        "exact",
        description="exact: every link found, the same verdicts in one process and in any number of partitions; "
        "index: an inverted-file index probing the nprobe nearest lists, much faster on features that do not "
        "cluster, which may miss a rare link (one process only)",
    )
    nprobe: int = Field(8, gt=0, description="with search: index, the lists each row is compared with")
    max_cells: int = Field(
        16384,
        gt=0,
        description="in partitions, the most cells the k-means fits (its cost on the flow's host grows as their "
        "square); features of many small clusters need about one cell a cluster for a row to go to few partitions",
    )


class NearDuplicates(Groups):
    """Images whose embeddings have cosine >= threshold are linked; each connected group of links, of
    any size, keeps its first image in input order and drops the others, naming the one kept.

    In partitions (:class:`clipforge.DecidesInPartitions`): k-means on a seeded sample gives about
    sqrt(n) cells (four times more, again, while a sampled row would go to more than ``MAX_SPREAD``
    partitions), grouped into partitions of about equal rows; each row goes to its nearest
    centroid's cell (its home) and to every other cell whose Voronoi region lies within ``r`` of it
    (by the distance to the bisector of the two centroids), ``r`` the largest distance at which two
    rows can still reach the threshold (``sqrt(2 m² - 2 t)``, ``m`` the largest norm). Each partition
    compares, cell by cell, every row that went to the cell with the cell's home rows, exactly; the
    links of every partition then make the groups at once. Exact: if ``x`` and ``y`` link,
    ``||x - y|| <= r``; the segment from ``x`` to ``y`` leaves ``x``'s region for ``y``'s home cell,
    so that cell lies within ``r`` of ``x``, and ``x`` meets ``y`` there.
    """

    reason = "near duplicate"
    #: The k-means of the one-process search and of the partitions: cells of about sqrt(n) rows (at most
    #: this many cells, ``max_cells`` in partitions, and at least one per partition), grouped into
    #: partitions of about equal rows; rows sampled per cell to train it.
    MAX_CELLS = 16384
    SAMPLE_PER_CELL = 40
    #: Partitions' cells are refitted, four times as many each round, while a sampled row goes to more
    #: than ``MAX_SPREAD`` partitions on average: when a cell holds several clusters, most rows lie near
    #: a bisector and go everywhere, which would put most of the data in every link task. Refits stop
    #: at ``max_cells``, at ``MIN_CELL_ROWS`` rows a cell, and after one that leaves the spread above
    #: ``REFIT_GAIN`` of what it was (features that do not cluster spread as far with more cells).
    MAX_SPREAD = 2.0
    MIN_CELL_ROWS = 32
    REFIT_GAIN = 0.75

    def __init__(
        self,
        threshold: float = 0.97,
        embedding: str = "thumbnail",
        model: str | None = None,
        device: str = "cpu",
        search: str = "exact",
        nprobe: int = 8,
        max_cells: int = MAX_CELLS,
        storage_options: dict[str, Any] | None = None,  # the recipe's, passed by the host
    ):
        if embedding == "model" and not model:
            raise clipforge.ConfigError("near-duplicates: embedding: model needs `model` (models:/NAME@champion or a folder)")
        self.threshold, self.device, self.search, self.nprobe = threshold, device, search, nprobe
        self.max_cells = max_cells
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
        first, similarity = near_groups(x, self.threshold, nprobe=self.nprobe if self.search == "index" else None)
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

    # -- in partitions ------------------------------------------------------------------------

    def _survey(self, plan: Any, block: Block) -> dict[str, Any]:
        rows, x = self._held(block)
        if plan is None:
            return {"n": len(x), "norm": _max_norm(x)}
        return {"sample": np.asarray(x[_draws(block.first + rows) < plan["rate"]], dtype=np.float32)}

    def _held(self, block: Block) -> tuple[np.ndarray, np.ndarray]:
        """The rows that can be a group's and their vectors (the block's own array when that is all of them)."""
        rows, x = self._rows(block), _vectors(block)
        return rows, (x if block.kept is None else x[rows])

    def plan(self, plan: Any, surveys: list[Any], partitions: int) -> tuple[Any, bool]:
        if plan is None and self.search == "index":
            raise clipforge.ConfigError(
                "near-duplicates: search: index decides in one process (its verdicts could differ from a "
                "partitioned decision's); with parallel.reduce_partitions above 1 use search: exact"
            )
        if plan is None:
            n = sum(s["n"] for s in surveys)
            norm = max((s["norm"] for s in surveys), default=0.0)
            cells = max(partitions, min(int(np.sqrt(n)), self.max_cells))
            return {**self._bounds(surveys), "n": n, "radius": _radius(norm, self.threshold), **self._sampled(cells, n)}, False
        sample = np.concatenate([s["sample"] for s in surveys if len(s["sample"])] or [np.zeros((0, 1), np.float32)])
        centroids, home = _centroids(sample, min(plan["cells"], len(sample)))
        assigned = np.zeros(len(centroids), dtype=np.int64)
        spread = 1.0
        if len(centroids) > 1:
            assigned = _grouped(centroids, np.bincount(home, minlength=len(centroids)), partitions)
            spread = _spread(sample, centroids, plan["radius"], assigned)
            more = min(4 * plan["cells"], self.max_cells, plan["n"] // self.MIN_CELL_ROWS)
            capped = more <= plan["cells"]
            helped = "fit" not in plan or spread <= self.REFIT_GAIN * plan["fit"]["spread"]
            if spread > self.MAX_SPREAD and not capped and helped:
                log.info("near-duplicates: %d cells send a row to %.1f partitions; fitting %d", len(centroids), spread, more)
                return {**plan, **self._sampled(more, plan["n"]), "fit": {"cells": len(centroids), "spread": spread}}, False
            if spread > self.MAX_SPREAD:
                why = (
                    f"the most for {plan['n']} rows: max_cells {self.max_cells}, at least {self.MIN_CELL_ROWS} rows a cell"
                    if capped
                    else f"with {plan['fit']['cells']} it was {plan['fit']['spread']:.1f}: the features do not cluster"
                )
                log.warning(
                    "near-duplicates: a row goes to %.1f of %d partitions on average with %d cells (%s): "
                    "each link task holds about %.1fx its share",
                    spread,
                    partitions,
                    len(centroids),
                    why,
                    spread,
                )
        return {**plan, "centroids": centroids, "partition_of_cell": assigned, "spread": spread}, True

    def _sampled(self, cells: int, n: int) -> dict[str, Any]:
        """The cells to fit and the rate at which the next survey samples rows to fit them."""
        return {"cells": cells, "rate": min(1.0, self.SAMPLE_PER_CELL * cells / max(n, 1))}

    def route(self, plan: Any, block: Block) -> dict[int, dict[str, Any]]:
        """Each row to the partition of its home cell and of every cell within the radius of it; with
        the cells (of that partition) it goes to, so that each cell is searched on its own."""
        rows, x = self._held(block)
        if not len(rows):
            return {}
        c, partition_of = plan["centroids"], plan["partition_of_cell"]
        if len(c) <= 1:
            zeros = np.zeros(len(rows), dtype=np.int64)
            return {0: _share(block.first + rows, x, zeros, np.arange(len(rows)), zeros)}
        row, cell, home = _reach(x, c, plan["radius"])
        partition = partition_of[cell]
        shares = {}
        for p in np.unique(partition).tolist():
            pairs = partition == p
            members, local = np.unique(row[pairs], return_inverse=True)
            shares[int(p)] = _share(block.first + rows[members], x[members], home[members], local.ravel(), cell[pairs])
        return shares

    def link(self, plan: Any, shares: list[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every link between the rows routed to a cell of this partition and the rows at home in it,
        found exactly; identical rows are linked by their bytes (as :func:`near_groups` does) and
        searched once. The shares' vectors are copied once, into one array of their own precision."""
        positions = [np.asarray(s["position"], dtype=np.int64) for s in shares]
        position = np.concatenate([np.zeros(0, np.int64), *positions])
        offsets = np.cumsum([0] + [len(p) for p in positions])
        x: np.ndarray | None = None
        home, row, cell = [], [], []
        for s, o, end in zip(shares, offsets, offsets[1:]):
            v = s["x"]
            if x is None:
                x = np.empty((len(position), v.shape[1]), dtype=v.dtype)
            elif v.dtype.itemsize > x.dtype.itemsize:  # a share kept at float32: the whole array is
                x = x.astype(v.dtype)
            x[o:end] = v
            home.append(s["home"])
            row.append(s["row"] + o)
            cell.append(s["cell"])
        if x is None or not len(x):
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        home_of, row_of, cell_of = np.concatenate(home), np.concatenate(row), np.concatenate(cell)
        if np.any(position[1:] < position[:-1]):  # shares come in block order, so their rows already are
            order = np.argsort(position, kind="stable")
            where = np.empty_like(order)
            where[order] = np.arange(len(order))
            position, x, home_of, row_of = position[order], x[order], home_of[order], where[row_of]
        # the first of identical rows (by position) stands for them all: they go to the same cells
        rep = _first_identical(x)
        copies = np.flatnonzero(rep != np.arange(len(x)))
        searched = rep[row_of] == row_of  # each cell's rows, their representatives only
        row_of, cell_of = row_of[searched], cell_of[searched]
        order = np.argsort(cell_of, kind="stable")
        row_of, cell_of = row_of[order], cell_of[order]
        reps = np.flatnonzero(rep == np.arange(len(x)))
        home_order = reps[np.argsort(home_of[reps], kind="stable")]
        home_cells = home_of[home_order]
        blocks = []
        for k in np.unique(cell_of).tolist():
            queries = row_of[np.searchsorted(cell_of, k) : np.searchsorted(cell_of, k, side="right")]
            members = home_order[np.searchsorted(home_cells, k) : np.searchsorted(home_cells, k, side="right")]
            blocks.append((queries, members))
        i, j, sims = _pairs_in(x, self.threshold, blocks)
        a = np.concatenate([position[i], position[rep[copies]]])
        b = np.concatenate([position[j], position[copies]])
        low, high = np.minimum(a, b), np.maximum(a, b)
        return low, high, np.concatenate([sims, np.ones(len(copies), dtype=np.float32)])

    def _scores(self, plan: Any, j: int) -> dict[str, float]:
        return {"similarity": float(plan["similarity"][j])}


#: Rows of a chunk whose products with every centroid (or a cell's rows) are held at once: ~16 MiB of float32.
CHUNK_VALUES = 1 << 22


def _vectors(block: Block) -> np.ndarray:
    """The block's features as rows, float16 as the parts store them (an empty block's as no rows);
    computations convert a chunk at a time to float32."""
    if not len(block.keys):
        return np.zeros((0, 1), dtype=np.float32)
    x = np.asarray(block.features)
    if x.dtype not in (np.float16, np.float32):
        x = x.astype(np.float32)
    return x.reshape(len(block.keys), -1)


def _max_norm(x: np.ndarray) -> float:
    """The largest norm of the rows, a chunk at a time."""
    step = max(1, CHUNK_VALUES // max(1, x.shape[1]))
    norms = [
        np.sqrt((q * q).sum(axis=1)).max()
        for q in (np.asarray(x[i : i + step], dtype=np.float32) for i in range(0, len(x), step))
    ]
    return float(max(norms)) if norms else 0.0


def _radius(norm: float, threshold: float) -> float:
    """The farthest apart two rows of norm at most ``norm`` can be and still reach the threshold, with
    room for float32 rounding."""
    return float(np.sqrt(max(0.0, 2 * norm * norm - 2 * threshold))) * (1 + 1e-3) + 1e-4


def _centroids(sample: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``k`` cells' centroids by k-means (FAISS, seeded) on ``sample``, and the home cell of each sample row."""
    if k <= 1:
        return (sample[:1] if len(sample) else np.zeros((0, 1), np.float32)), np.zeros(min(len(sample), 1), dtype=np.int64)
    import faiss

    kmeans = faiss.Kmeans(sample.shape[1], k, niter=10, seed=0, min_points_per_centroid=1)
    kmeans.train(np.ascontiguousarray(sample))
    _, home = kmeans.index.search(np.ascontiguousarray(sample), 1)
    return np.asarray(kmeans.centroids, dtype=np.float32), home.ravel().astype(np.int64)


def _reach(x: np.ndarray, c: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which cells each row can link into: pairs ``(row, cell)`` for its home cell (nearest centroid)
    and every cell whose Voronoi region lies within ``radius`` of it, and each row's home. A chunk of
    rows at a time, converted to float32, so that the distance matrices stay ~16 MiB."""
    cc = (c * c).sum(axis=1)
    step = max(64, min(4096, CHUNK_VALUES // max(1, len(c))))
    row_of, cell_of, homes = [], [], []
    for start in range(0, len(x), step):
        q = np.asarray(x[start : start + step], dtype=np.float32)
        d = (q * q).sum(axis=1)[:, None] - 2 * q @ c.T + cc[None, :]
        home = d.argmin(axis=1)
        gap = np.sqrt(np.maximum(cc[home][:, None] + cc[None, :] - 2 * c[home] @ c.T, 0))  # ||c_home - c_j||
        # the distance from q to the bisector of its home and c_j, within the radius: a linked row may live there
        near = (d - d[np.arange(len(q)), home][:, None]) <= 2 * radius * gap + 1e-5
        near[np.arange(len(q)), home] = True
        r, cell = np.nonzero(near)
        row_of.append(start + r)
        cell_of.append(cell)
        homes.append(home)
    if not homes:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return (np.concatenate(row_of).astype(np.int64), np.concatenate(cell_of).astype(np.int64),
            np.concatenate(homes).astype(np.int64))  # fmt: skip


def _spread(sample: np.ndarray, c: np.ndarray, radius: float, partition_of: np.ndarray) -> float:
    """The mean number of partitions a row goes to, over at most 65,536 rows of the sample (evenly strided)."""
    rows = sample[:: max(1, -(-len(sample) // 65536))]
    row, cell, _ = _reach(rows, c, radius)
    return len(np.unique(row * (int(partition_of.max()) + 1) + partition_of[cell])) / max(1, len(rows))


def _share(position: np.ndarray, x: np.ndarray, home: np.ndarray, row: np.ndarray, cell: np.ndarray) -> dict[str, Any]:
    """A partition's share of a block: its rows (positions, vectors, float16 where that loses nothing,
    home cells) and the cells each goes to (``row`` indexes the rows)."""
    half = x if x.dtype == np.float16 else x.astype(np.float16)
    exact = x.dtype == np.float16 or bool(np.array_equal(half.astype(np.float32), x, equal_nan=True))
    return {"position": position.astype(np.int64), "x": half if exact else x, "home": home.astype(np.int64),
            "row": row.astype(np.int64), "cell": cell.astype(np.int64)}  # fmt: skip


def _grouped(centroids: np.ndarray, sizes: np.ndarray, partitions: int) -> np.ndarray:
    """The partition of each cell: neighbouring cells together (a row goes to the cells around its own,
    and should find them in one partition), about equal rows in each. The cells are ordered by a
    recursive bisection of their centroids (2-means), so that near cells are near in the order, then
    cut into runs of equal rows."""
    leaf = max(1, len(centroids) // (8 * partitions))
    order = _bisected(np.ascontiguousarray(centroids), np.maximum(sizes, 1).astype(np.float32), np.arange(len(centroids)), leaf)
    ends = np.cumsum(np.maximum(sizes[order], 1))
    out = np.empty(len(sizes), dtype=np.int64)
    out[order] = np.minimum((ends - 1) * partitions // ends[-1], partitions - 1)
    return out


def _bisected(c: np.ndarray, weights: np.ndarray, cells: np.ndarray, leaf: int) -> np.ndarray:
    if len(cells) <= leaf:
        return cells
    import faiss

    kmeans = faiss.Kmeans(c.shape[1], 2, niter=10, seed=0, min_points_per_centroid=1)
    kmeans.train(c[cells], weights=weights[cells])
    _, side = kmeans.index.search(c[cells], 1)
    left = side.ravel() == 0
    if left.all() or not left.any():
        return cells
    return np.concatenate([_bisected(c, weights, cells[left], leaf), _bisected(c, weights, cells[~left], leaf)])


def _draws(positions: np.ndarray) -> np.ndarray:
    """A uniform draw in [0, 1) per position, fixed by the position alone: a sample that does not depend on the blocks."""
    x = positions.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


#: Odd 64-bit multipliers of a row's words, for the hash that finds identical rows.
_WORDS = np.random.default_rng(0x5EED).integers(1, 2**63, 4096, dtype=np.uint64) | np.uint64(1)


def _first_identical(x: np.ndarray) -> np.ndarray:
    """For each row, the first row (by index) with the same bytes. Rows are hashed to 64 bits, a chunk
    at a time, and rows of one hash compared byte by byte (rows that only share a hash are told apart
    exactly), so that no sorted copy of the rows is made."""
    n = len(x)
    if not n:
        return np.zeros(0, dtype=np.int64)
    raw = np.ascontiguousarray(x).view(np.uint8).reshape(n, x.itemsize * int(np.prod(x.shape[1:])))
    width = -(-raw.shape[1] // 8)
    words = np.resize(_WORDS, width)
    h = np.empty(n, dtype=np.uint64)
    step = max(1, (1 << 18) // width)  # rows of a chunk: ~2 MiB of words, and as much of their products
    for start in range(0, n, step):
        chunk = np.zeros((min(step, n - start), width * 8), dtype=np.uint8)
        chunk[:, : raw.shape[1]] = raw[start : start + step]
        h[start : start + len(chunk)] = (chunk.view(np.uint64) * words).sum(axis=1, dtype=np.uint64)
    order = np.argsort(h, kind="stable")
    starts = np.r_[True, h[order][1:] != h[order][:-1]]
    first = np.empty(n, dtype=np.int64)
    first[order] = order[np.flatnonzero(starts)][np.cumsum(starts) - 1]  # stable: the smallest index of its hash
    candidates = np.flatnonzero(first != np.arange(n))
    clash = [candidates[i : i + step][np.any(raw[candidates[i : i + step]] != raw[first[candidates[i : i + step]]], axis=1)]
             for i in range(0, len(candidates), step)]  # fmt: skip
    clashing = np.concatenate([np.zeros(0, np.int64), *clash])
    if len(clashing):  # rows that share a hash and differ: settled exactly, by their bytes
        rows = np.flatnonzero(np.isin(h, h[clashing]))
        _, unique, inverse = np.unique(raw[rows].view(np.dtype((np.void, raw.shape[1]))).ravel(), return_index=True,
                                       return_inverse=True)  # fmt: skip
        first[rows] = rows[unique[inverse.ravel()]]
    return first


#: Below this many vectors every pair is compared at once; above, the rows are compared cell by cell.
EXACT_BELOW = 10_000


def near_groups(
    x: np.ndarray, threshold: float, *, exact_below: int = EXACT_BELOW, nprobe: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Group rows whose inner product is >= ``threshold``, transitively (the connected components of
    those links): for each row, the first row of its group, and its highest similarity to a linked row.
    ``nprobe``: search an inverted-file index (:func:`indexed_pairs`) instead of every cell a link can be in.

    Identical rows (an image copied as is) are grouped by their bytes first and searched once, so
    that a group of thousands of copies does not make millions of links.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(x)
    x = np.ascontiguousarray(x, dtype=np.float32)
    rep = _first_identical(x)
    unique = np.flatnonzero(rep == np.arange(n))
    if nprobe is None:
        i, j, sims = near_pairs(x[unique], threshold, exact_below=exact_below)
    else:
        i, j, sims = indexed_pairs(x[unique], threshold, exact_below=exact_below, nprobe=nprobe)
    copies = np.flatnonzero(rep != np.arange(n))
    a = np.concatenate([unique[i], copies])
    b = np.concatenate([unique[j], rep[copies]])
    s = np.concatenate([sims, np.ones(len(copies), dtype=np.float32)])
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    first = np.full(component.max() + 1, n, dtype=np.int64)
    np.minimum.at(first, component, np.arange(n))
    similarity = np.zeros(n, dtype=np.float32)
    np.maximum.at(similarity, a, s)
    np.maximum.at(similarity, b, s)
    return first[component], similarity


def near_pairs(x: np.ndarray, threshold: float, *, exact_below: int = EXACT_BELOW) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair ``i < j`` of rows with inner product >= ``threshold``, and that product, exactly,
    never by a comparison of all pairs beyond ``exact_below`` rows: the search the partitioned
    decision runs, in one process.

    k-means (FAISS) on a sample gives about sqrt(n) cells; each row is compared, by one matrix product
    per cell, with the rows at home in its own cell and in every cell whose Voronoi region lies within
    the radius at which two rows can still reach the threshold (:func:`_reach`): where a linked row
    must live. The products are float32, so the cells only choose what is compared; features that
    cluster (as embeddings do) reach few cells, features spread evenly over the sphere reach most.
    """
    n = len(x)
    x = np.ascontiguousarray(x, dtype=np.float32)
    everything = [(np.arange(n), np.arange(n))]
    if n < max(exact_below, 2):
        return _pairs_in(x, threshold, everything)
    cells = min(int(np.sqrt(n)), NearDuplicates.MAX_CELLS)
    sample = x[_draws(np.arange(n)) < min(1.0, NearDuplicates.SAMPLE_PER_CELL * cells / n)]
    c, _ = _centroids(sample, min(cells, len(sample)))
    if len(c) <= 1:
        return _pairs_in(x, threshold, everything)
    row, cell, home = _reach(x, c, _radius(_max_norm(x), threshold))
    order = np.argsort(cell, kind="stable")
    row, cell = row[order], cell[order]
    members = np.argsort(home, kind="stable")
    reach_ends = np.searchsorted(cell, np.arange(len(c) + 1))
    home_ends = np.searchsorted(home[members], np.arange(len(c) + 1))
    blocks = ((row[reach_ends[k] : reach_ends[k + 1]], members[home_ends[k] : home_ends[k + 1]]) for k in range(len(c)))
    return _pairs_in(x, threshold, blocks)


def indexed_pairs(
    x: np.ndarray, threshold: float, *, exact_below: int = EXACT_BELOW, nprobe: int = 8
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pairs ``i < j`` at or above ``threshold`` that an inverted-file index finds: ~3 sqrt(n) lists
    around spherical k-means centroids (FAISS), each row compared with the rows of the ``nprobe``
    lists nearest to it, where a near copy of it falls (products exact float32; a link between rows
    whose lists are farther apart is missed). Much faster than :func:`near_pairs` on features spread
    evenly over the sphere, where no exact bound prunes."""
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
    x: np.ndarray, threshold: float, blocks: Iterable[tuple[np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pairs at or above ``threshold`` between each block's queries and its rows, each pair once;
    float32 products of a chunk of queries at a time (a cell of many copies holds many rows)."""
    n = len(x)
    found, products = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.float32)]
    for queries, rows in blocks:
        if not len(rows) or not len(queries):
            continue
        xr = np.asarray(x[rows], dtype=np.float32)
        chunk = max(16, min(1024, CHUNK_VALUES // len(rows)))
        for start in range(0, len(queries), chunk):
            q = queries[start : start + chunk]
            sims = np.asarray(x[q], dtype=np.float32) @ xr.T
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
