"""Training data: global batches of curated samples, each a pure function of (seed, epoch, batch).

An epoch's stream is the curated shards in a seeded order, cut into *units* of a few
consecutive samples on a grid that a seeded offset shifts each epoch (the stream wraps around
its end: a unit may take its last samples from the start); the units are permuted
(seeded), and global batch ``b`` is the ``b``-th run of ``global_batch / unit`` units. Rank ``r``
takes its contiguous share of those units and reads only their bytes, one ranged read per unit
through each shard's index: each rank reads about ``1/world`` of the data, and the global batch
is the same for any number of processes (as long as the unit divides the per-process batch).

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

    def __init__(self, sizes: list[int], *, seed: int, epoch: int, batch_size: int, world: int) -> None:
        rng = np.random.default_rng([seed, epoch])
        self.order = rng.permutation(len(sizes))  # the shards, in this epoch's order
        self.starts = np.cumsum([0, *(sizes[i] for i in self.order)])  # where each begins in the stream
        self.unit = unit_size(batch_size)
        self.total = int(self.starts[-1])
        self.shift = int(rng.integers(self.unit))  # the grid moves each epoch: units group other samples
        self.units = rng.permutation(self.total // self.unit)  # the stream's unit at each slot
        self.per_rank = batch_size // self.unit  # units of one rank's share of a batch
        self.per_batch = self.per_rank * world
        self.batches = len(self.units) // self.per_batch  # what is left over waits for another epoch's order

    def segments(self, batch: int, rank: int) -> Iterator[tuple[int, int, int]]:
        """``(shard index, first sample, count)``: the runs of samples of rank ``rank``'s share of ``batch``."""
        first = batch * self.per_batch + rank * self.per_rank
        for unit in self.units[first : first + self.per_rank]:
            position, left = (self.shift + int(unit) * self.unit) % self.total, self.unit
            while left:  # a unit may run over the end of a shard into the next, and the stream's end into its start
                k = int(np.searchsorted(self.starts, position, side="right")) - 1
                take = min(left, int(self.starts[k + 1]) - position)
                yield int(self.order[k]), position - int(self.starts[k]), take
                position, left = (position + take) % self.total, left - take


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
    ) -> None:
        self.store, self.shards, self.transform, self.tokenizer = store, shards, transform, tokenizer
        self.seed, self.batch_size, self.schedule, self.rank, self.world = seed, batch_size, schedule, rank, world
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
        for index, start, count in self.plan(epoch).segments(batch, self.rank):
            shard = self.shards[index]
            if index not in self._indexes:
                self._indexes[index] = read_index(self.store, shard.path)
            for raw in read_samples(self.store, shard.path, self._indexes[index], start, count):
                image, token = self._pair(raw, epoch)
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
