"""Training data: curated shards streamed in a seeded order that a resumed run replays exactly."""

from __future__ import annotations

import io
import random
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from PIL import Image

from clipforge.core.storage import Store
from clipforge.engine.shards import iter_shard


def epoch_order(shards: list[dict[str, Any]], seed: int, epoch: int) -> list[dict[str, Any]]:
    order = list(shards)
    random.Random(f"shards-{seed}-{epoch}").shuffle(order)
    return order


def worker_shards(shards: list[dict[str, Any]], seed: int, epoch: int, worker: int, workers: int) -> list[dict[str, Any]]:
    return epoch_order(shards, seed, epoch)[worker::workers]


def steps_in_epoch(shards: list[dict[str, Any]], seed: int, epoch: int, workers: int, batch_size: int) -> int:
    """Full batches one epoch yields: each loader worker batches its own shards and drops its last partial batch."""
    workers = max(workers, 1)
    return sum(sum(s["samples"] for s in worker_shards(shards, seed, epoch, w, workers)) // batch_size for w in range(workers))


class ShardPairs(torch.utils.data.IterableDataset):
    """(image tensor, token tensor) pairs from curated shards, shuffled by shard and through a buffer.

    Every random choice is a function of (seed, epoch, position), and augmentations are seeded
    per sample, so the stream does not depend on the number of loader workers' timing, and
    ``skip_batches`` lets a resumed run start exactly where the interrupted one stopped.

    Under DDP every rank reads the same stream of global batches of ``batch_size * world``
    pairs and decodes only its own slice of each, so the global batch does not depend on the
    number of processes (a 2-process run sees the batches of a 1-process run with twice the
    batch size).
    """

    def __init__(
        self,
        store: Store,
        shards: list[dict[str, Any]],
        transform: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor],
        *,
        seed: int,
        epoch: int,
        batch_size: int,
        workers: int,
        skip_batches: int = 0,
        buffer: int = 2000,
        rank: int = 0,
        world: int = 1,
    ):
        self.store, self.shards, self.transform, self.tokenizer = store, shards, transform, tokenizer
        self.seed, self.epoch, self.batch_size, self.workers = seed, epoch, batch_size, max(workers, 1)
        self.skip_batches, self.buffer = skip_batches, buffer
        self.rank, self.world = rank, world

    def _raw(self, worker: int) -> Iterator[dict[str, Any]]:
        rng = random.Random(f"buffer-{self.seed}-{self.epoch}-{worker}")
        buf: list[dict[str, Any]] = []
        for shard in worker_shards(self.shards, self.seed, self.epoch, worker, self.workers):
            for raw in iter_shard(self.store, shard["path"]):
                buf.append(raw)
                if len(buf) >= self.buffer:
                    i = rng.randrange(len(buf))
                    buf[i], buf[-1] = buf[-1], buf[i]
                    yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        # The loader hands out batches round-robin over workers: batch b comes from worker b % workers.
        global_batch = self.batch_size * self.world
        skip = len(range(worker, self.skip_batches, self.workers)) * global_batch
        for position, raw in enumerate(self._raw(worker)):
            if position < skip or (position % global_batch) // self.batch_size != self.rank:
                continue
            sample_seed = zlib.crc32(f"{self.seed}-{self.epoch}-{raw['key']}".encode())
            caption = raw["caption"]
            if isinstance(caption, list):
                caption = caption[sample_seed % len(caption)]
            # augmentation is a function of the sample, not of the stream; the model's RNG is left alone
            # (the CPU generator only: torch.manual_seed would also seed every CUDA device, slowly)
            saved = torch.get_rng_state()
            torch.default_generator.manual_seed(sample_seed)
            image = self.transform(Image.open(io.BytesIO(raw["image"])).convert("RGB"))
            torch.set_rng_state(saved)
            yield image, self.tokenizer([caption])[0]
