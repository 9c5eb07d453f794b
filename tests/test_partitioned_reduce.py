"""The reduce phase in partitions: for any number of partitions and any split into blocks, every
whole-dataset step gives the verdicts of its one-process decision, against a pool too."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

import clipforge
from clipforge.core.components import Pool
from clipforge.engine.curation import decide_in_partitions
from clipforge.engine.curation.partitioned import partitions_for
from clipforge.plugins.curation.balance import Balance
from clipforge.plugins.curation.clip_score import ClipScoreTop
from clipforge.plugins.curation.duplicates import ExactDuplicates, NearDuplicates

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def same(partitioned: list[clipforge.Verdict], at_once: list[clipforge.Verdict]) -> None:
    assert len(partitioned) == len(at_once)
    for i, (p, o) in enumerate(zip(partitioned, at_once)):
        assert (p.keep, p.reason, p.detail) == (o.keep, o.reason, o.detail), (i, p, o)
        assert p.scores.keys() == o.scores.keys(), (i, p, o)
        for name in o.scores:
            assert p.scores[name] == pytest.approx(o.scores[name], abs=1e-6, nan_ok=True), (i, name)


def blocks(draw, n: int) -> list[int]:
    """A split of n rows into blocks of any sizes, empty ones included."""
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=6)))
    return list(np.diff([0, *cuts, n]))


def planted(rng: np.random.Generator, groups: list[int], singles: int, dim: int, spread: float) -> np.ndarray:
    """Groups of near and identical copies around random centres plus unique rows, shuffled (so a group
    straddles blocks and partitions); unit rows, float16 as the parts store them."""
    rows = []
    for size in groups:
        centre = rng.standard_normal(dim)
        centre /= np.linalg.norm(centre)
        for m in range(size):
            rows.append(rows[-1] if m and m % 3 == 0 else centre + spread * rng.standard_normal(dim))
    rows += list(rng.standard_normal((singles, dim)))
    x = np.array(rows).reshape(-1, dim)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x[rng.permutation(len(x))].astype(np.float16).astype(np.float32)


@st.composite
def near_cases(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    groups = draw(st.lists(st.integers(1, 12), max_size=12))
    x = planted(
        rng, groups, draw(st.integers(0, 60)), draw(st.sampled_from([4, 8, 32])), draw(st.sampled_from([0.01, 0.05, 0.2]))
    )
    return x, draw(st.sampled_from([0.8, 0.9, 0.97, 0.995, 1.0])), draw(st.integers(1, 9)), blocks(draw, len(x))


@SETTINGS
@given(case=near_cases())
def test_near_duplicates_in_partitions_are_the_one_process_decision(case):
    x, threshold, partitions, sizes = case
    step = NearDuplicates(threshold=threshold)
    keys = [f"k{i}" for i in range(len(x))]
    same(decide_in_partitions(step, keys, x, partitions, sizes=sizes), step.decide(keys, x))


def test_a_group_whose_links_cross_every_partition_is_one_group():
    """A chain of rows, each linked only to the next, wound around the sphere: its links cross the
    partitions' boundaries; the chain stays one group, its first row kept."""
    angles = np.linspace(0, 2 * np.pi, 400, endpoint=False)
    x = np.stack([np.cos(angles), np.sin(angles), np.zeros_like(angles)], axis=1).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))
    x = np.concatenate([x[order], np.eye(3, dtype=np.float32)[2:]])  # and one row apart from it
    step = NearDuplicates(threshold=float(np.cos(2 * np.pi / 400 * 1.5)))
    keys = [f"k{i}" for i in range(len(x))]
    verdicts = decide_in_partitions(step, keys, x, 8)
    assert [v.keep for v in verdicts].count(True) == 2 and verdicts[0].keep and verdicts[-1].keep
    same(verdicts, step.decide(keys, x))


@st.composite
def exact_cases(draw):
    n = draw(st.integers(0, 300))
    digests = [f"{d:032x}" for d in draw(st.lists(st.integers(0, draw(st.integers(0, 2**40))), min_size=n, max_size=n))]
    return digests, draw(st.integers(1, 9)), blocks(draw, n)


@SETTINGS
@given(case=exact_cases())
def test_exact_duplicates_in_partitions_are_the_one_process_decision(case):
    digests, partitions, sizes = case
    step = ExactDuplicates()
    keys = [f"k{i}" for i in range(len(digests))]
    same(decide_in_partitions(step, keys, digests, partitions, sizes=sizes), step.decide(keys, digests))


@st.composite
def balance_cases(draw):
    entries = draw(st.integers(1, 8))
    n = draw(st.integers(0, 400))
    matches = [sorted(set(m)) for m in draw(st.lists(st.lists(st.integers(0, entries - 1), max_size=3), min_size=n, max_size=n))]
    words = ["cat", "dog", "猫", "chat", "Hund", "แมว", "red car", "ice"][:entries]
    step = Balance(entries=words, t=draw(st.integers(1, 60)), seed=draw(st.integers(0, 5)), keep_unmatched=draw(st.booleans()))
    return step, matches, draw(st.integers(1, 9)), blocks(draw, n)


@SETTINGS
@given(case=balance_cases())
def test_balancing_in_partitions_is_the_one_process_decision(case):
    step, matches, partitions, sizes = case
    keys = [f"k{i}" for i in range(len(matches))]
    same(decide_in_partitions(step, keys, matches, partitions, sizes=sizes), step.decide(keys, matches))


def top_step(fraction: float) -> ClipScoreTop:
    """The top-fraction step without its scoring model: the decision reads only the scores."""
    step = object.__new__(ClipScoreTop)
    step.model, step.fraction = "models:/scorer@champion", fraction
    return step


@st.composite
def top_cases(draw):
    n = draw(st.integers(0, 400))
    values = draw(st.sampled_from([
        st.floats(-1, 1, allow_nan=False),
        st.sampled_from([0.3, 0.25, 0.0, -0.0, 0.31, 1e-300, -1e-300]),  # ties, and keys that share their high bits
        st.floats(allow_nan=True, allow_infinity=True),
    ]))  # fmt: skip
    scores = draw(st.lists(values, min_size=n, max_size=n))
    return top_step(draw(st.floats(0.01, 1.0))), scores, draw(st.integers(1, 9)), blocks(draw, n)


@SETTINGS
@given(case=top_cases())
def test_a_top_fraction_in_partitions_is_the_one_process_decision(case):
    step, scores, partitions, sizes = case
    keys = [f"k{i}" for i in range(len(scores))]
    same(decide_in_partitions(step, keys, scores, partitions, sizes=sizes), step.decide(keys, scores))


def pool_of(features, kept: list[bool], statistics: bool, curations: int = 2) -> Pool:
    n = len(kept)
    ends = sorted({n, *np.linspace(0, n, curations + 1).astype(int)[1:]})
    return Pool(keys=[f"p{i}" for i in range(n)], features=features, kept=kept,
                manifests=[f"s3://b/curated/w{c}/manifest.parquet" for c in range(len(ends))], ends=ends,
                statistics=statistics)  # fmt: skip


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), seed=st.integers(0, 2**32 - 1), statistics=st.booleans(), partitions=st.integers(1, 6))
def test_every_step_against_a_pool_in_partitions_is_the_one_process_decision(data, seed, statistics, partitions):
    """The pool's rows come first and straddle the new data's partitions: copies of pool rows, entries
    capped by the pool's pairs, a top fraction among the pool's scores."""
    rng = np.random.default_rng(seed)
    x = planted(rng, list(rng.integers(1, 8, 10)), 40, 8, 0.05)
    n_pool = int(rng.integers(0, len(x)))
    kept = list(rng.random(n_pool) < 0.7)
    keys = [f"k{i}" for i in range(len(x) - n_pool)]
    sizes = blocks(data.draw, len(keys))
    digests = [f"{d:032x}" for d in rng.integers(0, 30, len(x))]
    matches = [sorted(set(rng.integers(0, 4, rng.integers(0, 3)).tolist())) for _ in range(len(x))]
    scores = [float(s) for s in rng.choice([0.2, 0.3, 0.25, 0.31], len(x))]
    cases = [
        (NearDuplicates(threshold=0.95), x[:n_pool], x[n_pool:]),
        (ExactDuplicates(), digests[:n_pool], digests[n_pool:]),
        (Balance(entries=["a", "b", "c", "d"], t=int(rng.integers(1, 20))), matches[:n_pool], matches[n_pool:]),
        (top_step(float(rng.uniform(0.05, 1))), scores[:n_pool], scores[n_pool:]),
    ]
    for step, in_pool, new in cases:
        pool = pool_of(in_pool, kept, statistics)
        same(decide_in_partitions(step, keys, new, partitions, sizes=sizes, pool=pool), step.decide_against(keys, new, pool))


def test_every_built_in_whole_dataset_step_declares_it_decides_in_partitions():
    for step in (NearDuplicates(), ExactDuplicates(), Balance(entries=["a"]), top_step(0.3)):
        assert isinstance(step, clipforge.DecidesInPartitions)


def test_the_number_of_partitions_follows_the_setting():
    assert partitions_for(1, 10**9) == 1 and partitions_for(7, 10) == 7
    assert partitions_for("auto", 0) == 1 and partitions_for("auto", 1_000_001) == 3


@pytest.mark.parametrize("dim, partitions", [(8, 3), (16, 7)])
def test_above_ten_thousand_rows_both_decisions_are_the_exact_one(dim, partitions):
    """Above the size where every pair is compared at once, the one-process search is the cells' exact
    search too: both decisions equal the one that compares every pair."""
    from clipforge.plugins.curation.duplicates import EXACT_BELOW, near_groups

    rng = np.random.default_rng(dim)
    x = planted(rng, list(rng.integers(2, 30, 150)), EXACT_BELOW + 2_000, dim, 0.03)
    threshold = 0.97
    step = NearDuplicates(threshold=threshold)
    keys = [f"k{i}" for i in range(len(x))]
    at_once = step.decide(keys, x)
    first, _ = near_groups(x, threshold, exact_below=len(x) + 1)  # every pair compared
    assert [v.keep for v in at_once] == (first == np.arange(len(x))).tolist()
    same(decide_in_partitions(step, keys, x, partitions), at_once)


@SETTINGS
@given(rows=st.lists(st.lists(st.sampled_from([0, 1, 2, 255]), min_size=3, max_size=3), max_size=60))
def test_identical_rows_are_told_by_their_bytes_even_when_their_hashes_clash(rows):
    """Each row's first identical row, as numpy's unique gives it, with the hash and with one under
    which every row clashes with every other (every multiplier 0)."""
    from clipforge.plugins.curation import duplicates

    x = np.array(rows, dtype=np.uint8).reshape(-1, 3)
    if len(x):
        _, unique, inverse = np.unique(x, axis=0, return_index=True, return_inverse=True)
        expected = unique[inverse.ravel()]
    else:
        expected = np.zeros(0, dtype=np.int64)
    saved = duplicates._WORDS
    try:
        for words in (saved, np.zeros_like(saved)):
            duplicates._WORDS = words
            assert duplicates._first_identical(x).tolist() == expected.tolist()
    finally:
        duplicates._WORDS = saved


@SETTINGS
@given(
    shape=st.lists(st.integers(0, 40), min_size=1, max_size=2),
    dtype=st.sampled_from(["float16", "float32", "int64", "S32"]),
    fortran=st.booleans(),
)
def test_a_parts_features_are_read_as_numpy_saved_them(tmp_path_factory, shape, dtype, fortran):
    """A block's features read straight into their array are the saved ones, whatever the shape, dtype and
    layout; a file that ends early is refused, naming it."""
    import io

    from clipforge.core.errors import StageError
    from clipforge.core.storage import Store
    from clipforge.engine.curation.partitioned import _read_features

    store = Store(str(tmp_path_factory.mktemp("features")))
    values = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape).astype(dtype)
    values = np.asfortranarray(values) if fortran else values
    buf = io.BytesIO()
    np.save(buf, values, allow_pickle=False)
    store.write_bytes("f.npy", buf.getvalue())
    got = _read_features(store, "f")
    assert got.dtype == values.dtype and got.shape == values.shape and np.array_equal(got, values)
    if values.nbytes:
        store.write_bytes("cut.npy", buf.getvalue()[:-1])
        fortran_order = values.flags.f_contiguous and not values.flags.c_contiguous  # numpy's own reader reads those
        with pytest.raises(ValueError) if fortran_order else pytest.raises(StageError, match="cut.npy: ends after"):
            _read_features(store, "cut")


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(2, 400),
    dim=st.sampled_from([2, 3, 8]),
    cells=st.integers(1, 60),
    threshold=st.sampled_from([0.5, 0.9, 0.99]),
)
def test_every_row_reaches_the_home_cell_of_every_row_it_can_link(seed, n, dim, cells, threshold):
    """The routing's invariant, for centroids trained on any sample: a row within the radius of another
    reaches that row's home cell (and its own), so their link is found there."""
    from clipforge.plugins.curation.duplicates import _centroids, _radius, _reach

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sample = x[rng.permutation(n)[: max(1, n // 2)]]
    c, _ = _centroids(sample, min(cells, len(sample)))
    row, cell, home = _reach(x, c, _radius(1.0, threshold))
    reached = set(zip(row.tolist(), cell.tolist()))
    assert all((i, int(home[i])) in reached for i in range(n))
    close = np.argwhere(x @ x.T >= threshold)
    missing = [(i, j) for i, j in close.tolist() if (i, int(home[j])) not in reached]
    assert not missing, missing[:5]


def clustered(rng: np.random.Generator, n: int, cluster_rows: int | None, dim: int) -> np.ndarray:
    """Rows around random (so nearly orthogonal) centres at cosine ~0.8, 5 % of them near copies of
    another row: several clusters to a sqrt(n) cell when the clusters are small; ``None``: no
    clusters, rows spread evenly over the sphere."""
    if cluster_rows is None:
        x = rng.standard_normal((n, dim))
    else:
        centres = rng.standard_normal((max(1, n // cluster_rows), dim))
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        x = centres[rng.integers(0, len(centres), n)] + 0.75 * rng.standard_normal((n, dim)) / np.sqrt(dim)
    copies = np.flatnonzero(rng.random(n) < 0.05)
    x[copies] = x[rng.integers(0, n, len(copies))] + 0.05 * rng.standard_normal((len(copies), dim)) / np.sqrt(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16).astype(np.float32)


def recorded_plans(step: NearDuplicates) -> list[tuple[dict, bool]]:
    """What each of the step's ``plan`` calls returns, in order, from now on."""
    plans, fit = [], step.plan

    def plan(*args):
        plans.append(result := fit(*args))
        return result

    step.plan = plan  # type: ignore[method-assign]
    return plans


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(3_000, 12_000),
    cluster_rows=st.sampled_from([15, 40, 200, None]),
    dim=st.sampled_from([32, 64]),
    partitions=st.integers(2, 12),
    max_cells=st.sampled_from([16384, 150]),
)
@example(seed=1, n=12_000, cluster_rows=40, dim=64, partitions=12, max_cells=150)  # stopped by max_cells
@example(seed=0, n=12_000, cluster_rows=15, dim=64, partitions=12, max_cells=16384)
def test_cells_are_refitted_until_a_row_goes_to_few_partitions(seed, n, cluster_rows, dim, partitions, max_cells, caplog):
    """When a sqrt(n) cell holds several clusters, most rows lie near a bisector and would go to most
    partitions: the plan fits more cells until a sampled row goes to at most MAX_SPREAD partitions, or
    says (a warning) that it could fit no more (``max_cells``, or too few rows a cell) or that more
    did not help (features that do not cluster); the verdicts are the one-process decision either way."""
    x = clustered(np.random.default_rng(seed), n, cluster_rows, dim)
    step = NearDuplicates(threshold=0.97, max_cells=max_cells)
    plans = recorded_plans(step)
    keys = [f"k{i}" for i in range(n)]
    caplog.clear()  # one example's warnings only
    with caplog.at_level("WARNING", logger="clipforge.plugins.curation.duplicates"):
        same(decide_in_partitions(step, keys, x, partitions), step.decide(keys, x))
    final = plans[-1][0]
    cells = [p["cells"] for p, _ in plans]
    assert cells == sorted(cells) and len(final["centroids"]) == min(cells[-1], len(x))
    assert cells[-1] <= max(max_cells, partitions, cells[0])
    capped = min(4 * cells[-1], step.max_cells, n // step.MIN_CELL_ROWS) <= cells[-1]
    spreads = [p["fit"]["spread"] for p, _ in plans[1:-1]] + [final["spread"]]  # each fit's, in order
    stuck = not capped and len(spreads) > 1 and spreads[-1] > step.REFIT_GAIN * spreads[-2]
    assert all(s > step.MAX_SPREAD for s in spreads[:-1])  # a refit only where a row spread too far
    assert all(b <= step.REFIT_GAIN * a for a, b in itertools.pairwise(spreads[:-1]))  # and each one helped
    assert final["spread"] <= step.MAX_SPREAD or capped or stuck
    warned = [r.getMessage() for r in caplog.records if "each link task holds" in r.getMessage()]
    assert bool(warned) == (final["spread"] > step.MAX_SPREAD)
    if len(plans) > 2:  # refitted: the cells before were too few
        assert cells[-1] > cells[0]
    event("refitted" if len(plans) > 2 else "the first cells")
    event("did not cluster" if stuck else "capped" if final["spread"] > step.MAX_SPREAD else "within MAX_SPREAD")


def test_features_that_do_not_cluster_are_refitted_once(caplog):
    """Rows spread evenly over the sphere go as far with four times the cells: one refit, then a
    warning that says so; the verdicts are the one-process decision."""
    x = clustered(np.random.default_rng(7), 8_000, None, 32)
    step = NearDuplicates(threshold=0.97)
    step.MIN_CELL_ROWS = 2  # room for more refits than one, so that only the spread stops them
    plans = recorded_plans(step)
    keys = [f"k{i}" for i in range(len(x))]
    with caplog.at_level("WARNING", logger="clipforge.plugins.curation.duplicates"):
        same(decide_in_partitions(step, keys, x, 8), step.decide(keys, x))
    assert [p["cells"] for p, _ in plans] == [89, 356, 356]
    assert plans[-1][0]["spread"] > step.REFIT_GAIN * plans[1][0]["fit"]["spread"]
    assert any("the features do not cluster" in r.getMessage() for r in caplog.records)
