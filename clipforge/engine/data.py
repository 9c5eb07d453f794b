"""Training data: global batches of curated samples, each a pure function of (seed, epoch, batch).

An epoch's stream is the curated shards in a seeded order, cut into *units* of a few
consecutive samples on a grid that a seeded offset shifts each epoch (the stream wraps around
its end: a unit may take its last samples from the start); the units are permuted
(seeded), and global batch ``b`` is the ``b``-th run of ``global_batch / unit`` units. Rank ``r``
takes its contiguous share of those units and reads only their bytes, one ranged read per unit
through each shard's index: each rank reads about ``1/world`` of the data, and the global batch
is the same for any number of processes (as long as the unit divides the per-process batch).

A weighted mixture (:class:`MixturePlan`) draws each global batch's units from several sources:
each source's share of a run's units is fixed by the weights (exact to a unit), the batches'
compositions are a seeded draw without replacement from those shares, and each source's units
come from its own stream of passes (a pass is an :class:`EpochPlan` of its shards, reshuffled when
it runs out). Every batch is a function of (seed, weights, budget, batch): a source twice as large
changes which samples are drawn, never how many.

One loader serves a whole run; its workers take whole batches, round-robin from the first
batch not yet trained: no worker starves when shards are fewer than workers, the batch order
does not depend on the number of workers, and a resumed run starts at any batch. Augmentations
are seeded per sample.
"""

from __future__ import annotations

import io
import math
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image

from clipforge.core.results import Shard
from clipforge.core.storage import Store
from clipforge.engine.shards import read_index, read_samples

#: Consecutive samples read together, at most: fewer, larger reads against more varied batches.
UNIT = 8


def unit_size(batch_size: int) -> int:
    """The unit of a per-process batch: its largest divisor up to :data:`UNIT`.

    Runs with other process counts see the same global batches when their per-process batches
    give the same unit: any multiple of 8 does."""
    return math.gcd(batch_size, UNIT)


class EpochPlan:
    """Which samples make each global batch of an epoch, and each rank's share of it."""

    def __init__(
        self, sizes: list[int], *, seed: int, epoch: int, batch_size: int, world: int, stream: int | None = None
    ) -> None:
        # ``stream``: one source of a mixture, whose passes are shuffled apart from the other sources'
        rng = np.random.default_rng([seed, epoch] if stream is None else [seed, stream, epoch])
        self.order = rng.permutation(len(sizes))  # the shards, in this epoch's order
        self.starts = np.cumsum([0, *(sizes[i] for i in self.order)])  # where each begins in the stream
        self.unit = unit_size(batch_size)
        self.total = int(self.starts[-1])
        self.shift = int(rng.integers(self.unit))  # the grid moves each epoch: units group other samples
        self.units = rng.permutation(self.total // self.unit)  # the stream's unit at each slot
        self.per_rank = batch_size // self.unit  # units of one rank's share of a batch
        self.per_batch = self.per_rank * world
        self.batches = len(self.units) // self.per_batch  # what is left over waits for another epoch's order

    def segments(self, batch: int, rank: int, epoch: int = 0) -> Iterator[tuple[int, int, int, int]]:
        """``(shard index, first sample, count, epoch)``: the runs of samples of rank ``rank``'s share of
        ``batch`` (``epoch``: this epoch's number, which seeds the samples' augmentations)."""
        first = batch * self.per_batch + rank * self.per_rank
        for slot in range(first, first + self.per_rank):
            for shard, start, count in self.unit_segments(slot):
                yield shard, start, count, epoch

    def unit_segments(self, slot: int) -> Iterator[tuple[int, int, int]]:
        """``(shard index, first sample, count)``: the runs of samples of the unit at ``slot`` of this epoch."""
        position, left = (self.shift + int(self.units[slot]) * self.unit) % self.total, self.unit
        while left:  # a unit may run over the end of a shard into the next, and the stream's end into its start
            k = int(np.searchsorted(self.starts, position, side="right")) - 1
            take = min(left, int(self.starts[k + 1]) - position)
            yield int(self.order[k]), position - int(self.starts[k]), take
            position, left = (position + take) % self.total, left - take


def shares(total: int, weights: list[float]) -> np.ndarray:
    """``total`` split in proportion to ``weights`` by largest remainders: exact, summing to ``total``."""
    w = np.asarray(weights, dtype=np.float64)
    quotas = total * w / w.sum()
    counts = np.floor(quotas).astype(np.int64)
    order = np.argsort(-(quotas - counts), kind="stable")  # ties: the earlier source
    counts[order[: total - int(counts.sum())]] += 1
    return counts


class MixturePlan:
    """Which samples of which source make each global batch of a run drawn from weighted sources.

    ``sizes[k]``: the samples of each shard of source ``k``, ``shard_offsets[k]``: the index of its
    first shard among all the run's shards, ``streams[k]``: a number that shuffles its passes apart
    (from its name: reordering the sources changes no source's stream).
    """

    def __init__(
        self, sizes: list[list[int]], weights: list[float], streams: list[int], *, seed: int, batch_size: int,
        world: int, batches: int,
    ) -> None:  # fmt: skip
        self.sizes, self.streams, self.seed, self.batch_size, self.world = sizes, streams, seed, batch_size, world
        self.unit = unit_size(batch_size)
        self.per_rank = batch_size // self.unit
        self.per_batch = self.per_rank * world
        self.shard_offsets = np.cumsum([0, *(len(s) for s in sizes)])[:-1]
        self.source_units = [sum(s) // self.unit for s in sizes]  # units of one pass over each source
        self.quota = shares(batches * self.per_batch, weights)  # each source's units over the whole run
        rng = np.random.default_rng([seed, batches, 0x6D6978])  # "mix": apart from the sources' own streams
        left, self.take = self.quota.copy(), np.zeros((batches, len(sizes)), dtype=np.int64)
        for b in range(batches):  # each batch draws its units without replacement from what the shares leave
            self.take[b] = rng.multivariate_hypergeometric(left, self.per_batch)
            left -= self.take[b]
        self.before = np.cumsum(self.take, axis=0) - self.take  # each source's units drawn before each batch
        self._passes: dict[tuple[int, int], EpochPlan] = {}

    @property
    def batches(self) -> int:
        return len(self.take)

    def seen(self) -> list[int]:
        """The samples each source gives the whole run."""
        return [int(q) * self.unit for q in self.quota]

    def segments(self, batch: int, rank: int, epoch: int = 0) -> Iterator[tuple[int, int, int, int]]:
        """``(shard index, first sample, count, pass)``: the runs of samples of rank ``rank``'s share of
        ``batch`` (shards numbered over all sources; ``pass``: the pass over its source the unit is of)."""
        labels = np.repeat(np.arange(len(self.sizes)), self.take[batch])
        labels = labels[np.random.default_rng([self.seed, batch, 0x6D6978]).permutation(len(labels))]
        # the n-th unit of source k in the batch is unit before[batch, k] + n of its stream
        nth = np.zeros(len(labels), dtype=np.int64)
        for k in range(len(self.sizes)):
            mine = labels == k
            nth[mine] = self.before[batch, k] + np.arange(int(mine.sum()))
        first = rank * self.per_rank
        for k, n in zip(labels[first : first + self.per_rank].tolist(), nth[first : first + self.per_rank].tolist(), strict=True):
            passed, slot = divmod(n, self.source_units[k])
            for shard, start, count in self._pass(k, passed).unit_segments(slot):
                yield int(self.shard_offsets[k]) + shard, start, count, passed

    def _pass(self, source: int, number: int) -> EpochPlan:
        if (source, number) not in self._passes:
            self._passes[(source, number)] = EpochPlan(
                self.sizes[source], seed=self.seed, epoch=number, batch_size=self.batch_size, world=self.world,
                stream=self.streams[source],
            )  # fmt: skip
        return self._passes[(source, number)]


class ShardBatches(torch.utils.data.IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
    """One rank's share of the global batches ``schedule`` (``(epoch, batch)`` pairs, in the order
    they are trained), as (images, tokens) tensors: what a ``DataLoader(batch_size=None)`` hands
    the training loop. One loader serves a whole run, so its workers start once."""

    def __init__(
        self,
        store: Store,
        shards: list[Shard],
        transform: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor],
        *,
        seed: int,
        batch_size: int,
        schedule: list[tuple[int, int]],
        rank: int = 0,
        world: int = 1,
        mixture: MixturePlan | None = None,
    ) -> None:
        self.store, self.shards, self.transform, self.tokenizer = store, shards, transform, tokenizer
        self.seed, self.batch_size, self.schedule, self.rank, self.world = seed, batch_size, schedule, rank, world
        self.mixture = mixture  # batches drawn from weighted sources (``shards``: all of theirs, in order)
        self._plans: dict[int, EpochPlan] = {}
        self._indexes: dict[int, np.ndarray] = {}

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # the loader takes one item from each worker in turn: worker w makes items w, w + workers, ...
        for epoch, batch in self.schedule[worker::workers]:
            yield self.batch(epoch, batch)

    def plan(self, epoch: int) -> EpochPlan:
        if epoch not in self._plans:
            sizes = [s.samples for s in self.shards]
            self._plans[epoch] = EpochPlan(sizes, seed=self.seed, epoch=epoch, batch_size=self.batch_size, world=self.world)
        return self._plans[epoch]

    def batch(self, epoch: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, tokens = [], []
        plan = self.mixture or self.plan(epoch)
        for index, start, count, passed in plan.segments(batch, self.rank, epoch):
            shard = self.shards[index]
            if index not in self._indexes:
                self._indexes[index] = read_index(self.store, shard.path)
            for raw in read_samples(self.store, shard.path, self._indexes[index], start, count):
                image, token = self._pair(raw, passed)
                images.append(image)
                tokens.append(token)
        return torch.stack(images), torch.stack(tokens)

    def _pair(self, raw: dict[str, Any], epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample_seed = zlib.crc32(f"{self.seed}-{epoch}-{raw['key']}".encode())
        caption = raw["caption"]
        if isinstance(caption, list):
            caption = caption[sample_seed % len(caption)]
        # augmentation is a function of the sample, not of the stream; the model's RNG is left alone
        # (the CPU generator only: torch.manual_seed would also seed every CUDA device, slowly)
        saved = torch.get_rng_state()
        torch.default_generator.manual_seed(sample_seed)
        image = self.transform(Image.open(io.BytesIO(raw["image"])).convert("RGB"))
        torch.set_rng_state(saved)
        return image, self.tokenizer([caption])[0]
