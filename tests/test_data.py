"""Training data at scale: global batches are a pure function of (seed, epoch, batch), split among
ranks without changing, each rank reads about 1/world of the bytes, and loader workers share the
batches whatever the shards' sizes and number."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clipforge.core.results import Shard
from clipforge.core.storage import Store
from clipforge.engine.data import EpochPlan, ShardBatches
from clipforge.engine.shards import ShardWriter, decode, write_index
from clipforge.testing import tiny_dataset, tiny_encoder_bundle

# more loader workers than this machine has cores: what is tested is their order, not their speed
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")


def samples_of(plan: EpochPlan, batch: int, rank: int) -> list[tuple[int, int]]:
    return [(shard, start + i) for shard, start, count, _ in plan.segments(batch, rank) for i in range(count)]


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 60), min_size=1, max_size=9),
    per_rank=st.sampled_from([8, 16, 24, 32]),
    world=st.sampled_from([1, 2, 3, 4, 8]),
    seed=st.integers(0, 2**31),
    epoch=st.integers(0, 50),
)
def test_the_global_batches_do_not_depend_on_the_number_of_ranks(sizes, per_rank, world, seed, epoch):
    one = EpochPlan(sizes, seed=seed, epoch=epoch, batch_size=per_rank * world, world=1)
    many = EpochPlan(sizes, seed=seed, epoch=epoch, batch_size=per_rank, world=world)
    assert one.batches == many.batches == sum(sizes) // (per_rank * world)
    seen = []
    for b in range(one.batches):
        whole = samples_of(one, b, 0)
        assert len(whole) == per_rank * world
        assert [s for r in range(world) for s in samples_of(many, b, r)] == whole
        seen += whole
    assert len(set(seen)) == len(seen)  # an epoch takes each sample once at most
    assert all(0 <= i < sizes[shard] for shard, i in seen)


@settings(max_examples=50, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=2, max_size=6), seed=st.integers(0, 1000))
def test_each_epoch_has_its_own_order_and_the_same_epoch_the_same(sizes, seed):
    plans = [EpochPlan(sizes, seed=seed, epoch=e, batch_size=8, world=1) for e in (0, 0, 1)]
    orders = [[samples_of(p, b, 0) for b in range(p.batches)] for p in plans]
    assert orders[0] == orders[1]
    if sum(sizes) >= 64:  # eight units or more: two epochs in one order would be a coincidence (1 in 8! or less)
        assert orders[0] != orders[2]


def write_shards(store: Store, sizes: list[int]) -> list[Shard]:
    items = iter(decode(s) for s in tiny_dataset(sum(sizes)))
    shards = []
    for i, n in enumerate(sizes):
        with ShardWriter(store, f"shard-{i:03d}.tar") as writer:
            for _ in range(n):
                writer.add(next(items))
            shards.append(Shard.model_validate(writer.close()))
            write_index(store, shards[-1].path, writer.offsets)
    return shards


class CountingStore(Store):
    """A store that counts the bytes read through it."""

    read = 0

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        data = super().read_range(rel, start, end)
        CountingStore.read += len(data)
        return data


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    return str(root), write_shards(Store(str(root)), [37, 3, 2, 11, 1])  # 54 pairs, fewer shards than workers below


def schedule(shards: list[Shard], epochs: range, first: int = 0, batch_size: int = 8, world: int = 1) -> list[tuple[int, int]]:
    """Every (epoch, batch) of ``epochs``, from batch ``first`` of the first."""
    sizes = [s.samples for s in shards]
    return [
        (e, b)
        for e in epochs
        for b in range(
            first if e == epochs[0] else 0, EpochPlan(sizes, seed=3, epoch=e, batch_size=batch_size, world=world).batches
        )
    ]


def batches_of(root: str, shards: list[Shard], *, workers: int = 0, first: int = 0) -> list[torch.Tensor]:
    bundle = tiny_encoder_bundle()
    data = ShardBatches(Store(root), shards, bundle.preprocess_train, bundle.tokenizer, seed=3, batch_size=8,
                        schedule=schedule(shards, range(1, 3), first))  # fmt: skip
    spawned = {"multiprocessing_context": "spawn"} if workers else {}
    return [images for images, _ in torch.utils.data.DataLoader(data, batch_size=None, num_workers=workers, **spawned)]


@pytest.mark.parametrize(("workers", "first"), [(1, 0), (3, 0), (7, 2), (2, 5)])
def test_workers_never_starve_and_any_start_gives_the_same_batches(uneven, workers, first):
    root, shards = uneven
    reference = batches_of(root, shards)  # two epochs, one process, no worker
    assert len(reference) == 2 * (54 // 8)
    got = batches_of(root, shards, workers=workers, first=first)
    assert len(got) == len(reference) - first
    assert all(torch.equal(a, b) for a, b in zip(got, reference[first:]))


@pytest.mark.parametrize("world", [2, 3])
def test_each_rank_reads_its_share_of_the_bytes_and_gets_its_slice_of_the_batch(uneven, world):
    root, shards = uneven
    CountingStore.read = 0
    bundle = tiny_encoder_bundle()

    def run(rank: int, w: int, batch_size: int) -> list[torch.Tensor]:
        data = ShardBatches(CountingStore(root), shards, bundle.preprocess_train, bundle.tokenizer, seed=3, batch_size=batch_size,
                            schedule=schedule(shards, range(1, 2), batch_size=batch_size, world=w), rank=rank, world=w)  # fmt: skip
        return [images for images, _ in data]

    whole = run(0, 1, 8 * world)
    total, reads = CountingStore.read, []
    shares = []
    for rank in range(world):
        CountingStore.read = 0
        shares.append(run(rank, world, 8))
        reads.append(CountingStore.read)
    assert sum(reads) == total  # together the ranks read what one process reads, no byte twice
    assert all(abs(r - total / world) <= 0.35 * total / world for r in reads), (reads, total)
    for b, batch in enumerate(whole):
        assert torch.equal(torch.cat([share[b] for share in shares]), batch)


def test_a_shard_index_gives_every_sample_by_a_ranged_read(tmp_path):
    from clipforge.engine.shards import iter_shard, read_index, read_samples

    store = Store(str(tmp_path))
    (shard,) = write_shards(store, [13])
    index = read_index(store, shard.path)
    everything = list(iter_shard(store, shard.path))
    assert len(index) == 14 and index[-1] + 1024 == store.fs.size(store.path(shard.path))
    for _ in range(20):
        start = random.randrange(13)
        count = random.randrange(1, 14 - start)
        assert [s["key"] for s in read_samples(store, shard.path, index, start, count)] == [
            s["key"] for s in everything[start : start + count]
        ]
