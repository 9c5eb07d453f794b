"""Weighted mixtures on a budget: each global batch is a pure function of (seed, weights, budget,
batch), the sources' shares are exact to a unit, the batches do not depend on the number of ranks,
and a source's size changes which samples are drawn, never how many."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clipforge.core.errors import RecipeError, StageError
from clipforge.core.results import CurateResult, Shard, SourceShards
from clipforge.core.validation import load_recipe
from clipforge.engine.data import MixturePlan, shares, unit_size
from clipforge.engine.training.loop import plan_budget
from tests.conftest import TINY_RECIPE


def drawn(plan: MixturePlan, batch: int, rank: int) -> list[tuple[int, int, int]]:
    """(shard, sample, pass) of every sample of ``rank``'s share of ``batch``."""
    return [(shard, start + i, p) for shard, start, count, p in plan.segments(batch, rank) for i in range(count)]


def source_of(plan: MixturePlan, shard: int) -> int:
    return max(k for k, first in enumerate(plan.shard_offsets) if first <= shard)


sources_st = st.lists(st.lists(st.integers(1, 40), min_size=1, max_size=4), min_size=1, max_size=4)


@settings(max_examples=120, deadline=None)
@given(
    sizes=sources_st,
    weights=st.lists(st.floats(0.0, 5.0, allow_nan=False), min_size=4, max_size=4),
    per_rank=st.sampled_from([8, 16, 24]),
    world=st.sampled_from([1, 2, 3, 4]),
    batches=st.integers(1, 12),
    seed=st.integers(0, 2**31),
)
def test_the_shares_are_exact_and_the_batches_do_not_depend_on_the_ranks(sizes, weights, per_rank, world, batches, seed):
    weights = weights[: len(sizes)]
    if sum(weights) == 0:
        weights[0] = 1.0
    sizes = [[max(s, 8) for s in source] for source in sizes]  # every source holds a unit at least
    streams = list(range(len(sizes)))
    one = MixturePlan(sizes, weights, streams, seed=seed, batch_size=per_rank * world, world=1, batches=batches)
    many = MixturePlan(sizes, weights, streams, seed=seed, batch_size=per_rank, world=world, batches=batches)
    counts: Counter[int] = Counter()
    per_pass: Counter[tuple[int, int, int]] = Counter()
    for b in range(batches):
        whole = drawn(one, b, 0)
        assert len(whole) == per_rank * world
        assert [s for r in range(world) for s in drawn(many, b, r)] == whole
        for shard, sample, p in whole:
            k = source_of(one, shard)
            assert 0 <= sample < sizes[k][shard - one.shard_offsets[k]]
            counts[k] += 1
            per_pass[(shard, sample, p)] += 1
    unit = unit_size(per_rank * world)
    expected = shares(batches * per_rank * world // unit, weights) * unit
    assert [counts[k] for k in range(len(sizes))] == expected.tolist() == one.seen()
    assert all(n == 1 for n in per_pass.values())  # a pass over a source draws each of its samples once at most
    assert all(counts[k] == 0 for k, w in enumerate(weights) if w == 0)


@settings(max_examples=60, deadline=None)
@given(
    sizes=sources_st,
    weights=st.lists(st.floats(0.1, 5.0), min_size=4, max_size=4),
    grow=st.integers(0, 3),
    factor=st.sampled_from([2, 3, 7]),
    batches=st.integers(1, 20),
    seed=st.integers(0, 2**31),
)
def test_a_larger_source_changes_which_samples_never_how_many(sizes, weights, grow, factor, batches, seed):
    sizes = [[max(s, 8) for s in source] for source in sizes]
    weights, grow = weights[: len(sizes)], grow % len(sizes)
    bigger = [[s * factor for s in source] if k == grow else source for k, source in enumerate(sizes)]
    streams = list(range(len(sizes)))
    a = MixturePlan(sizes, weights, streams, seed=seed, batch_size=16, world=1, batches=batches)
    b = MixturePlan(bigger, weights, streams, seed=seed, batch_size=16, world=1, batches=batches)
    assert (a.take == b.take).all() and a.seen() == b.seen()


def _sources(*sizes: int) -> list[SourceShards]:
    return [
        SourceShards(name=f"s{k}", weight=float(k + 1), shards=[Shard(path=f"s{k}.tar", samples=n, sha256="")])
        for k, n in enumerate(sizes)
    ]


@settings(max_examples=40, deadline=None)
@given(budget=st.integers(16, 5000), small=st.integers(8, 500), factor=st.sampled_from([2, 10]), world=st.sampled_from([1, 2, 4]))
def test_a_budget_fixes_the_steps_whatever_the_sources_sizes(budget, small, factor, world):
    r = copy.deepcopy(TINY_RECIPE)
    del r["train"]["epochs"]
    r["train"].update(batch_size=16, budget={"samples": budget})
    cfg = load_recipe(r).train
    if budget < 16 * world:
        with pytest.raises(StageError, match="less than one global batch"):
            plan_budget(_sources(small, 300), cfg, world)
        return
    plan, mixture = plan_budget(_sources(small, 300), cfg, world)
    again, other = plan_budget(_sources(small * factor, 300), cfg, world)
    assert plan.total == again.total == budget // (16 * world)
    assert mixture.seen() == other.seen() and sum(mixture.seen()) == plan.total * 16 * world


def test_a_budget_in_steps(tiny_recipe):
    del tiny_recipe["train"]["epochs"]
    tiny_recipe["train"].update(batch_size=16, accum_steps=2, budget={"steps": 7})
    plan, mixture = plan_budget(_sources(50, 30), load_recipe(tiny_recipe).train, 2)
    assert plan.total == 7 and mixture.batches == 14 and sum(mixture.seen()) == 7 * 16 * 2 * 2


def mixture_recipe(tiny_recipe, **weights):
    base = tiny_recipe["data"]["train"]
    tiny_recipe["data"]["train"] = [
        {"source": {**base, "seed": i}, "weight": w, "name": name} for i, (name, w) in enumerate(weights.items())
    ]
    return tiny_recipe


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r["data"]["train"][0].update(weight=-1.0), r"data\.train\.0\.weight: Input should be greater than or equal to 0"),
        (lambda r: r["data"]["train"][1].update(weight="three"), r"data\.train\.1\.weight: Input should be a valid number"),
        (lambda r: r["data"]["train"][1].update(weight=float("nan")), r"data\.train\.1\.weight"),
        (lambda r: [s.update(weight=0) for s in r["data"]["train"]], "every source has weight 0"),
        (lambda r: r["data"]["train"][1].update(name="crawl"), "sources named twice: crawl"),
        (lambda r: r["data"]["train"][1].update(name="replay"), "'replay' names the replayed data"),
        (lambda r: r["data"].update(train=[]), r"data\.train"),
        (lambda r: r["train"].update(budget={"samples": 16}), "train.epochs and train.budget both set"),
        (lambda r: (r["train"].pop("epochs"), r["train"].update(budget={"samples": 31})), "less than one global batch"),
        (
            lambda r: (r["train"].pop("epochs"), r["train"].update(budget={"samples": 40},
                                                                     launcher={"type": "torchrun", "nproc_per_node": 2})),
            r"less than one global batch \(train.batch_size=32 x 2 process",
        ),
        (lambda r: (r["train"].pop("epochs"), r["train"].update(budget={"samples": 64, "steps": 2})), "exactly one of"),
    ],
)  # fmt: skip
def test_bad_weights_and_budgets_are_one_clear_error(tiny_recipe, change, message):
    recipe = mixture_recipe(tiny_recipe, crawl=1.0, pool=3.0)
    change(recipe)
    with pytest.raises(RecipeError, match=message):
        load_recipe(recipe)


def test_a_mixture_recipe_curates_each_source_as_a_recipe_of_its_own(tiny_recipe):
    recipe = load_recipe(mixture_recipe(tiny_recipe, crawl=1.0, pool=3.0))
    assert recipe.draws_by_weight()
    subs = recipe.source_recipes()
    assert [(s.label, s.weight) for s, _ in subs] == [("crawl", 1.0), ("pool", 3.0)]
    assert [sub.data.dataset.fields["seed"] for _, sub in subs] == [0, 1]
    assert all(sub.data.mixture is None for _, sub in subs)
    # the kinds table finds the sources' dataset entries, so validation checks them
    assert [p for kind, p, _ in recipe.component_entries() if p.startswith("data.train")] == [
        "data.train.0.source",
        "data.train.1.source",
    ]


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sources=st.lists(st.tuples(st.integers(1, 40), st.floats(0.0, 0.5), st.integers(0, 9)), min_size=1, max_size=3),
    shard_size=st.sampled_from([7, 50]),
)
def test_every_sample_of_every_source_is_one_row_of_the_mixtures_manifest(tmp_path_factory, sources, shard_size):
    """Input samples = manifest rows, per source, with crawl defects: kept or dropped with a reason, never merged."""
    import pyarrow.parquet as pq

    import clipforge
    from clipforge.core.recipe import MixtureSource
    from clipforge.core.storage import Store
    from clipforge.engine.curation import curate, curation_key
    from clipforge.engine.curation.mixture import gather_mixture
    from clipforge.engine.shards import iter_shard

    r = copy.deepcopy(TINY_RECIPE)
    r["storage"] = {"root": str(tmp_path_factory.mktemp("mix"))}
    r["parallel"] = {"shard_size": shard_size}
    r["curation"] = [{"type": "caption-length", "min_words": 2}]
    r["data"]["train"] = [
        {"source": {**r["data"]["train"], "size": n, "defects": d, "seed": seed}, "name": f"s{k}"}
        for k, (n, d, seed) in enumerate(sources)
    ]
    recipe = load_recipe(r)
    store, catalog = Store(recipe.storage.root), clipforge.get_plugin_manager().catalog
    curated: list[tuple[MixtureSource, CurateResult]] = []
    for source, sub in recipe.source_recipes():
        curated.append((source, curate(sub, catalog, store, f"curated/{curation_key(sub)}", progress=False)))
    mixed = gather_mixture(store, curated)
    rows = pq.read_table(store.path(mixed.manifest)).to_pylist()
    for (source, result), (n, _, _) in zip(curated, sources, strict=True):
        mine = [row for row in rows if row["source"] == source.label]
        assert len(mine) == len({row["key"] for row in mine}) == n == result.input
        assert all(row["kept"] or (row["step"] and row["reason"]) for row in mine)
        kept = sorted(row["key"] for row in mine if row["kept"])
        assert kept == sorted(s["key"] for shard in result.shards for s in iter_shard(store, shard.path))
    assert mixed.input == len(rows) == sum(n for n, _, _ in sources)
    assert mixed.kept == sum(row["kept"] for row in rows) == sum(s.samples for s in mixed.shards)
    assert [s.name for s in mixed.sources] == [f"s{k}" for k in range(len(sources))]
