"""The reduce phase in partitions: a whole-dataset step that declares
:class:`~clipforge.core.components.DecidesInPartitions` decides in tasks of bounded memory on the
recipe's runner (``parallel.reduce_partitions`` above 1), with the verdicts it gives over every row at once.

The host holds the survivors' keys and each task's small answers (surveys, links); the features stay on
the store and each task reads only its block (one part's survivors) or its partition's share of them.
A partition's share is written by the blocks routed to it, as ``.npz`` files under
``reduce-partitions/<step>/`` (removed once the step has decided).
"""

from __future__ import annotations

import bisect
import io
import math
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from clipforge.core.components import Block, DecidesAgainstPool, DecidesInPartitions, Verdict
from clipforge.core.errors import StageError
from clipforge.core.recipe import Recipe
from clipforge.core.storage import Store
from clipforge.engine.curation.layout import PART_DONE, features_of, load_features, part_dir, part_survivor_keys
from clipforge.engine.curation.plan import Job, build_steps

if TYPE_CHECKING:
    from clipforge.engine.curation.pool import PoolChain

#: ``parallel.reduce_partitions: auto``: one partition per this many survivors.
AUTO_ROWS = 500_000
#: A plan that is still not done after this many survey rounds is a step's bug, not a long refinement.
MAX_ROUNDS = 64
SHARES = "reduce-partitions"
#: ``mapper(fn, jobs)`` gives ``fn(job)`` for each job, in order (the builtin ``map`` does).
Mapper = Callable[[Callable[[Any], Any], list[Any]], Iterable[Any]]


def partitions_for(setting: int | str, rows: int) -> int:
    """The number of partitions ``parallel.reduce_partitions`` asks for, over ``rows`` survivors."""
    if setting == "auto":
        return max(1, math.ceil(rows / AUTO_ROWS))
    return int(setting)


# -- the sequence, whoever runs the calls ------------------------------------------------------


class Runner:
    """Runs a step's per-block and per-partition calls (here, in this process, over blocks in memory)."""

    def __init__(self, step: DecidesInPartitions, blocks: list[Block]) -> None:
        self.step, self.blocks = step, blocks
        self.shares: dict[tuple[int, int], dict[str, Any]] = {}

    def survey(self, plan: Any) -> list[Any]:
        return [self.step.survey(plan, b) for b in self.blocks]

    def route(self, plan: Any) -> list[list[int]]:
        written = []
        for i, b in enumerate(self.blocks):
            shares = self.step.route(plan, b)
            self.shares.update({(p, i): share for p, share in shares.items()})
            written.append(sorted(shares))
        return written

    def link(self, plan: Any, holders: dict[int, list[int]]) -> list[Any]:
        return [self.step.link(plan, [self.shares[(p, b)] for b in bs]) for p, bs in sorted(holders.items())]

    def decide(self, plan: Any) -> list[list[Verdict]]:
        return [list(self.step.decide_block(plan, b)) for b in self.blocks if not b.pool]

    def name(self, position: int) -> str:
        return name_in(self.blocks, position)

    def close(self) -> None:
        self.shares.clear()


def name_in(blocks: list[Block], position: int) -> str:
    """How a verdict's detail names the row at ``position``: its key, and for a pool's row its manifest."""
    b = blocks[bisect.bisect_right([x.first for x in blocks], position) - 1]
    key = b.keys[position - b.first]
    return f"{key} in {b.origin}" if b.pool else key


def drive(step: DecidesInPartitions, runner: Runner, partitions: int) -> list[Verdict]:
    """The protocol's sequence: survey rounds until the plan is done, routing, links per partition,
    settling, then the verdicts block by block (the new data's, in order)."""
    plan, done, rounds = None, False, 0
    while not done:
        if rounds == MAX_ROUNDS:
            raise StageError(f"{type(step).__name__}.plan() was not done after {MAX_ROUNDS} survey rounds")
        plan, done = step.plan(plan, runner.survey(plan), partitions)
        rounds += 1
    holders: dict[int, list[int]] = {}
    for b, written in enumerate(runner.route(plan)):
        for p in written:
            if not 0 <= p < partitions:
                raise StageError(f"{type(step).__name__}.route() sent rows to partition {p}, not among 0..{partitions - 1}")
            holders.setdefault(p, []).append(b)
    try:
        plan = step.settle(plan, runner.link(plan, holders) if holders else [], runner.name)
        return [v for verdicts in runner.decide(plan) for v in verdicts]
    finally:
        runner.close()


def decide_in_partitions(
    step: DecidesInPartitions,
    keys: list[str],
    features: Any,
    partitions: int,
    *,
    sizes: list[int] | None = None,
    pool: Any = None,
) -> list[Verdict]:
    """The step's verdicts on ``keys`` decided in ``partitions``, in this process: the rows split into
    blocks of ``sizes`` (default: ``partitions`` about equal ones), after the :class:`~clipforge.Pool`
    ``pool``'s rows in blocks of their own curations. What the conformance kit and the tests compare
    with ``decide``."""
    blocks: list[Block] = []
    if pool is not None and len(pool.keys):
        start = 0
        for c, end in enumerate(pool.ends or [len(pool.keys)]):
            blocks.append(Block(features=_rows(pool.features, start, end), first=start, keys=list(pool.keys[start:end]),
                                kept=list(pool.kept[start:end]), origin=pool.manifests[c] if pool.manifests else "pool",
                                statistics=pool.statistics))  # fmt: skip
            start = end
    first = len(pool.keys) if pool is not None else 0
    sizes = sizes if sizes is not None else [len(x) for x in np.array_split(np.arange(len(keys)), max(1, partitions))]
    if sum(sizes) != len(keys):
        raise ValueError(f"block sizes {sizes} do not add up to {len(keys)} rows")
    start = 0
    for size in sizes:
        blocks.append(Block(features=_rows(features, start, start + size), first=first + start, keys=keys[start : start + size]))
        start += size
    return drive(step, Runner(step, blocks), partitions)


def _rows(features: Any, start: int, end: int) -> Any:
    return features[start:end] if isinstance(features, np.ndarray) else list(features[start:end])


# -- the same sequence as tasks over the store -----------------------------------------------


class BlockRef(BaseModel):
    """Where a task finds a block: part ``part`` of the curation in ``out`` on ``store``, the survivors
    step ``label`` saw there (all but the local indices ``skip``), and for a pool's part which it kept
    (all but the indices, among those seen, in ``unkept``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    store: str
    out: str
    part: int
    label: str
    first: int
    skip: list[int] = []
    unkept: list[int] | None = None
    origin: str = ""
    statistics: bool = True


class ReduceJob(Job):
    """One call of a partitioned step, as a task: ``index`` is the block's (or the partition's) number."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)
    label: str  # the step's label in ``recipe``
    plan: Any
    block: BlockRef | None = None
    holders: list[int] = Field(default_factory=list)  # a partition's: the blocks whose shares it reads


def load_block(ref: BlockRef, options: dict[str, Any] | None, *, features: bool = True) -> Block:
    """The block ``ref`` names, read from its store (its keys only, without ``features``)."""
    store = Store(ref.store, options)
    keys = part_survivor_keys(store, ref.out, ref.part)
    seen = np.ones(len(keys), dtype=bool)
    seen[ref.skip] = False
    values: Any = None
    if features:
        values = _read_features(store, features_of(ref.out, ref.part, ref.label))
        if len(values) != len(keys):
            raise StageError(
                f"{store.uri(part_dir(ref.out, ref.part))}: {len(values)} features of {ref.label} for {len(keys)} survivors"
            )
        if ref.skip:  # as stored (float16 embeddings stay float16): a task holds its block once
            values = values[seen] if isinstance(values, np.ndarray) else [v for v, s in zip(values, seen) if s]
    keys = [k for k, s in zip(keys, seen) if s]
    kept = None
    if ref.unkept is not None:
        mask = np.ones(len(keys), dtype=bool)
        mask[ref.unkept] = False
        kept = mask.tolist()
    return Block(features=values, first=ref.first, keys=keys, kept=kept, origin=ref.origin, statistics=ref.statistics)


def _read_features(store: Store, rel: str) -> Any:
    """A part's features: a ``.npy`` array read straight into its buffer (never the file's bytes and the
    array at once), else what :func:`load_features` reads."""
    if not store.exists(f"{rel}.npy"):
        return load_features(store, rel)
    with store.open(f"{rel}.npy") as f:
        version = np.lib.format.read_magic(f)
        header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        shape, fortran, dtype = header(f) if header else ((), True, np.dtype(object))
        if fortran or dtype.hasobject:  # a layout numpy's own reader handles
            f.seek(0)
            return np.load(io.BytesIO(f.read()), allow_pickle=False)
        values = np.empty(shape, dtype=dtype)
        view = values.reshape(-1).view(np.uint8).data
        read = cast(Any, f).readinto
        done = 0
        while done < len(view):
            got = read(view[done:])
            if not got:
                raise StageError(f"{store.uri(rel)}.npy: ends after {done} of {len(view)} bytes")
            done += got
        return values


class StoredShare(Mapping[str, np.ndarray]):
    """One share a block routed to a partition, read from the store array by array as a step looks them
    up, so that a link task holds what the step builds from its shares rather than every share too."""

    def __init__(self, store: Store, path: str) -> None:
        self.store, self.path = store, path
        with self.store.open(path) as f, zipfile.ZipFile(f) as z:
            self.names = [n.removesuffix(".npy") for n in z.namelist()]

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.names:
            raise KeyError(name)
        with self.store.open(self.path) as f, np.load(f, allow_pickle=False) as arrays:
            return arrays[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _step(job: ReduceJob) -> tuple[DecidesInPartitions, Store]:
    recipe, catalog, store = job.open()
    step = dict(build_steps(recipe, catalog).whole)[job.label]
    if not isinstance(step, DecidesInPartitions):
        raise StageError(f"curation step {job.label!r} no longer decides in partitions")
    return step, store


def _block(job: ReduceJob) -> Block:
    if job.block is None:
        raise StageError(f"reduce task {job.index} of {job.label!r} names no block")
    return load_block(job.block, job.recipe.storage.options)


def _share_path(job: ReduceJob, partition: int, block: int) -> str:
    return f"{job.out}/{SHARES}/{job.label}/p-{partition:06d}/b-{block:06d}.npz"


def survey_block(job: ReduceJob) -> Any:
    """Task: the step's survey of one block."""
    step, _ = _step(job)
    return step.survey(job.plan, _block(job))


def route_block(job: ReduceJob) -> list[int]:
    """Task: one block's shares, written for the partitions they go to; returns those partitions."""
    step, store = _step(job)
    shares = step.route(job.plan, _block(job))
    for p, share in shares.items():
        buf = io.BytesIO()
        np.savez(buf, allow_pickle=False, **{name: np.asarray(a) for name, a in share.items()})
        store.write_bytes(_share_path(job, p, job.index), buf.getvalue())
    return sorted(shares)


def link_partition(job: ReduceJob) -> Any:
    """Task: the step's links within one partition, over the shares routed to it."""
    step, store = _step(job)
    return step.link(job.plan, [StoredShare(store, _share_path(job, job.index, b)) for b in job.holders])


def decide_block(job: ReduceJob) -> list[Verdict]:
    """Task: the step's verdicts on one block of the new data."""
    step, _ = _step(job)
    return list(step.decide_block(job.plan, _block(job)))


#: The tasks of a partitioned reduce, for a mapper that runs known functions (the curate flow's Prefect tasks).
TASKS = (survey_block, route_block, link_partition, decide_block)


class StoreRunner(Runner):
    """The calls as tasks of ``mapper``, each reading its block or its partition's shares from the store."""

    def __init__(self, step: DecidesInPartitions, recipe: Recipe, store: Store, out: str, label: str,
                 refs: list[BlockRef], names: Callable[[int], str], mapper: Mapper) -> None:  # fmt: skip
        self.step, self.recipe, self.store, self.out, self.label = step, recipe, store, out, label
        self.refs, self.names, self.mapper = refs, names, mapper

    def _jobs(self, plan: Any, refs: Iterable[tuple[int, BlockRef]]) -> list[ReduceJob]:
        return [ReduceJob(recipe=self.recipe, store=self.store.url, out=self.out, index=i, label=self.label, plan=plan, block=r)
                for i, r in refs]  # fmt: skip

    def survey(self, plan: Any) -> list[Any]:
        return list(self.mapper(survey_block, self._jobs(plan, enumerate(self.refs))))

    def route(self, plan: Any) -> list[list[int]]:
        return list(self.mapper(route_block, self._jobs(plan, enumerate(self.refs))))

    def link(self, plan: Any, holders: dict[int, list[int]]) -> list[Any]:
        jobs = [ReduceJob(recipe=self.recipe, store=self.store.url, out=self.out, index=p, label=self.label, plan=plan, holders=bs)
                for p, bs in sorted(holders.items())]  # fmt: skip
        return list(self.mapper(link_partition, jobs))

    def decide(self, plan: Any) -> list[list[Verdict]]:
        return list(self.mapper(decide_block, self._jobs(plan, ((i, r) for i, r in enumerate(self.refs) if r.unkept is None))))

    def name(self, position: int) -> str:
        return self.names(position)

    def close(self) -> None:
        folder = self.store.path(f"{self.out}/{SHARES}/{self.label}")
        if self.store.fs.exists(folder):
            self.store.fs.rm(folder, recursive=True)


def decide_partitioned(
    step: DecidesInPartitions,
    label: str,
    step_type: str,
    recipe: Recipe,
    store: Store,
    out: str,
    part_sizes: list[int],
    keys: list[str],
    alive: np.ndarray,
    partitions: int,
    mapper: Mapper,
    pool: PoolChain | None = None,
) -> list[Verdict]:
    """Step ``label``'s verdicts on the survivors still ``alive`` (positions over every part's survivors,
    ``part_sizes`` of them in each part), decided in ``partitions`` as tasks of ``mapper``; with a
    ``pool``, after its blocks (when the step decides against one)."""
    refs, pool_refs = [], []
    if pool is not None and isinstance(step, DecidesAgainstPool):
        pool_refs = _pool_refs(pool, step_type, step)
    first = sum(r_count for _, r_count in pool_refs)
    refs = [r for r, _ in pool_refs]
    new_start, start = first, 0
    index = np.flatnonzero(alive)
    for i, size in enumerate(part_sizes):
        local = alive[start : start + size]
        refs.append(BlockRef(store=store.url, out=out, part=i, label=label, first=first,
                             skip=np.flatnonzero(~local).tolist()))  # fmt: skip
        first += int(local.sum())
        start += size
    pool_keys: dict[int, list[str]] = {}
    firsts = [r.first for r in refs]

    def names(position: int) -> str:
        if position >= new_start:
            return keys[index[position - new_start]]
        b = bisect.bisect_right(firsts, position) - 1
        if b not in pool_keys:
            pool_keys[b] = load_block(refs[b], recipe.storage.options, features=False).keys
        return f"{pool_keys[b][position - refs[b].first]} in {refs[b].origin}"

    return drive(step, StoreRunner(step, recipe, store, out, label, refs, names, mapper), partitions)


def _pool_refs(pool: PoolChain, step_type: str, step: DecidesAgainstPool) -> list[tuple[BlockRef, int]]:
    """The pool's blocks for this step, oldest curation first, each with how many rows it holds."""
    from clipforge.engine.curation.pool import label_in, stopped_at

    refs: list[tuple[BlockRef, int]] = []
    first = 0
    signature = step.features_signature()
    for c in pool.curations:
        label = label_in(c, step_type, signature)
        order, stopped = stopped_at(c)
        at = order.index(label)
        start = 0
        for i in range(c.index["parts"]):
            size = int(c.store.read_json(f"{part_dir(c.out, i)}/{PART_DONE}")["kept"])
            where = [stopped.get(p, len(order)) for p in range(start, start + size)]
            seen = [j for j, s in enumerate(where) if s >= at]
            skip = [j for j, s in enumerate(where) if s < at]
            unkept = [n for n, j in enumerate(seen) if where[j] < len(order)]
            refs.append((BlockRef(store=c.store.url, out=c.out, part=i, label=label, first=first, skip=skip, unkept=unkept,
                                  origin=c.manifest, statistics=pool.statistics), len(seen)))  # fmt: skip
            first += len(seen)
            start += size
    return refs
