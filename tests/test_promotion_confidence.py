"""A promotion that knows noise from progress: the seeded paired bootstrap, and the gate that uses it
on a real MLflow registry (a SQLite store in the test's tmp_path)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clipforge import PerSample
from clipforge.core.bootstrap import metric_value, paired_interval, resampled
from clipforge.registry import PromotionError, promote_if_better
from tests.test_registry import aliases, register, store, tags, template_db  # noqa: F401  (fixtures)

METRIC = "eval/zero-shot-classification/acc1"


def hits(n: int, correct: int, seed: int) -> list[float]:
    values = np.zeros(n)
    values[np.random.default_rng(seed).choice(n, correct, replace=False)] = 1
    return values.tolist()


def keys(n: int) -> list[str]:
    return [f"s{i:05d}" for i in range(n)]


# -- the bootstrap -----------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(5, 400),
    a=st.floats(0, 1),
    b=st.floats(0, 1),
    seed=st.integers(0, 2**16),
    conf=st.sampled_from([0.8, 0.9, 0.95, 0.99]),
)
def test_the_interval_holds_the_delta_and_is_the_same_for_any_key_order(n, a, b, seed, conf):
    ours = PerSample(keys(n), hits(n, round(a * n), seed))
    theirs = PerSample(keys(n), hits(n, round(b * n), seed + 1))
    iv = paired_interval(theirs, ours, conf, resamples=400, seed=3)
    assert iv.delta == pytest.approx(metric_value(ours) - metric_value(theirs))
    assert iv.low <= iv.delta + 1e-12 and iv.delta - 1e-12 <= iv.high and iv.n == n
    order = np.random.default_rng(seed).permutation(n)
    shuffled = PerSample([ours.keys[i] for i in order], [ours.values[i] for i in order])
    again = paired_interval(theirs, shuffled, conf, resamples=400, seed=3)
    assert again.delta == pytest.approx(iv.delta)  # pairs are matched by key, not by position
    assert paired_interval(theirs, ours, conf, resamples=400, seed=3) == iv  # seeded


@settings(max_examples=25, deadline=None)
@given(n=st.integers(10, 300), seed=st.integers(0, 2**16))
def test_two_models_right_on_the_same_samples_have_an_interval_of_zero(n, seed):
    values = hits(n, n // 2, seed)
    iv = paired_interval(PerSample(keys(n), values), PerSample(keys(n)[::-1], values[::-1]), 0.95, resamples=300)
    assert iv.low == iv.high == iv.delta == 0


def test_only_the_samples_both_were_measured_on_count():
    a = PerSample(keys(10), [1.0] * 10)
    b = PerSample(keys(20)[5:], [0.0] * 15)
    iv = paired_interval(a, b, 0.9, resamples=200)
    assert iv.n == 5 and iv.delta == -1.0
    with pytest.raises(ValueError, match="share no sample"):
        paired_interval(a, PerSample(["other"], [1.0]), 0.9)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(3, 300),
    accuracies=st.lists(st.floats(0, 1), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
)
def test_several_records_are_resampled_on_the_same_draws_matched_by_key(n, accuracies, seed):
    records = [PerSample(keys(n), hits(n, round(a * n), seed + i)) for i, a in enumerate(accuracies)]
    order = np.random.default_rng(seed).permutation(n)
    records.append(PerSample([records[0].keys[i] for i in order], [records[0].values[i] for i in order]))
    full, spread = resampled(records, resamples=300, seed=5)
    assert spread.shape == (300, len(records))
    assert full == pytest.approx([metric_value(r) for r in records])
    assert np.array_equal(spread[:, 0], spread[:, -1])  # the same samples in another order: the same draws
    assert ((spread >= 0) & (spread <= 1)).all()
    if len(records) > 2:  # the paired interval is the spread of the difference of two columns
        iv = paired_interval(records[0], records[1], 0.9, resamples=300, seed=5)
        pair = resampled(records[:2], resamples=300, seed=5)[1]
        assert (iv.low, iv.high) == pytest.approx(tuple(np.quantile(pair[:, 1] - pair[:, 0], [0.05, 0.95])))


def test_resampling_needs_a_sample_every_record_has():
    with pytest.raises(ValueError, match="3 models' per-sample results share no sample key"):
        resampled([PerSample(["a", "b"], [1, 0]), PerSample(["b"], [1]), PerSample(["a"], [0])])
    with pytest.raises(ValueError, match="no per-sample results"):
        resampled([])


@settings(max_examples=30, deadline=None)
@given(labels=st.lists(st.integers(0, 5), min_size=2, max_size=80), seed=st.integers(0, 999))
def test_a_grouped_metric_is_the_mean_over_the_groups_present(labels, seed):
    from sklearn.metrics import balanced_accuracy_score

    n = len(labels)
    right = hits(n, n // 2, seed)
    record = PerSample(keys(n), right, groups=labels)
    predicted = [y if r else (y + 1) % 7 for y, r in zip(labels, right, strict=True)]
    assert metric_value(record) == pytest.approx(balanced_accuracy_score(labels, predicted))


def test_the_spread_shrinks_with_more_samples():
    widths = []
    for n in (100, 1600):
        a, b = PerSample(keys(n), hits(n, n // 2, 0)), PerSample(keys(n), hits(n, n // 2, 1))
        iv = paired_interval(a, b, 0.95, resamples=500)
        widths.append(iv.high - iv.low)
    assert widths[1] < widths[0] / 2.5  # about 1/sqrt(16) = 1/4


# -- the gate on a real registry ---------------------------------------------------------------


def _versions(champion_hits: list[float], challenger_hits: list[float]):
    """v1 champion, v2 challenger, each with acc1 and its per-sample hits on the same 600 samples."""
    n = len(champion_hits)
    per = {
        "1": {METRIC: PerSample(keys(n), champion_hits)},
        "2": {METRIC: PerSample(keys(n), challenger_hits)},
    }
    metrics = {v: {METRIC: metric_value(r[METRIC])} for v, r in per.items()}
    register(metrics["1"][METRIC], metric=METRIC)
    promote_if_better("shapes-clip", "1", metric=METRIC)
    register(metrics["2"][METRIC], metric=METRIC)
    return metrics.__getitem__, per.__getitem__


@pytest.mark.usefixtures("store")
def test_a_challenger_better_by_noise_is_refused_and_a_clear_win_promoted():
    n = 600
    champion = hits(n, 300, 0)
    noise = list(champion)
    flipped = [i for i, v in enumerate(noise) if v == 0][:3]
    for i in flipped:  # right on 3 more of 600
        noise[i] = 1.0
    metrics_of, samples_of = _versions(champion, noise)
    promoted, previous = promote_if_better(
        "shapes-clip", "2", metric=METRIC, metrics_of=metrics_of, confidence=0.95, samples_of=samples_of
    )
    assert not promoted and previous == "1" and aliases()["champion"] == "1"
    reason = tags("2")["promotion_reason"]
    assert "the gain may be noise" in reason and "at 0.95 over 600 samples" in reason
    # without the confidence the same numbers pass the bare threshold
    promoted, _ = promote_if_better("shapes-clip", "2", metric=METRIC, metrics_of=metrics_of)
    assert promoted

    win = list(champion)
    for i in [i for i, v in enumerate(win) if v == 0][:60]:  # right on 60 more of 600
        win[i] = 1.0
    register(metric_value(PerSample(keys(n), win)), metric=METRIC)
    per = {"2": {METRIC: PerSample(keys(n), noise)}, "3": {METRIC: PerSample(keys(n), win)}}
    measured = {v: {METRIC: metric_value(r[METRIC])} for v, r in per.items()}
    promoted, previous = promote_if_better(
        "shapes-clip", "3", metric=METRIC, metrics_of=measured.__getitem__, confidence=0.95, samples_of=per.__getitem__
    )
    assert promoted and previous == "2" and aliases()["champion"] == "3"
    assert "at 0.95 over 600 samples" in tags("3")["promotion_reason"]


@pytest.mark.usefixtures("store")
def test_a_guard_with_a_confidence_refuses_a_drop_that_may_pass_its_budget():
    n = 600
    guard = "eval/imagenet1k/zero-shot-classification/acc1"
    champion_hits = hits(n, 300, 0)
    challenger_hits = list(champion_hits)
    for i in [i for i, v in enumerate(challenger_hits) if v == 0][:80]:
        challenger_hits[i] = 1.0
    before = hits(n, 400, 5)
    after = list(before)
    for i in [i for i, v in enumerate(after) if v == 1][:2]:  # 2 of 600 fewer: a point estimate within 0.005
        after[i] = 0.0
    per = {
        "1": {METRIC: PerSample(keys(n), champion_hits), guard: PerSample(keys(n), before)},
        "2": {METRIC: PerSample(keys(n), challenger_hits), guard: PerSample(keys(n), after)},
    }
    measured = {v: {m: metric_value(r) for m, r in p.items()} for v, p in per.items()}
    register(measured["1"][METRIC], metric=METRIC)
    promote_if_better("shapes-clip", "1", metric=METRIC)
    register(measured["2"][METRIC], metric=METRIC)
    gate = {"metric": METRIC, "metrics_of": measured.__getitem__, "samples_of": per.__getitem__, "confidence": 0.95}
    promoted, _ = promote_if_better("shapes-clip", "2", guards=[(guard, 0.005, 0.95)], **gate)
    assert not promoted
    assert tags("2")["promotion_guard"].startswith(f"{guard} may drop by up to")
    promoted, _ = promote_if_better("shapes-clip", "2", guards=[(guard, 0.005)], **gate)  # the point estimate passes
    assert promoted


@pytest.mark.usefixtures("store")
def test_a_metric_without_per_sample_results_is_named():
    _, samples_of = _versions(hits(50, 10, 0), hits(50, 40, 1))
    with pytest.raises(PromotionError, match="'eval/suite/average' has no per-sample results for champion v1"):
        promote_if_better(
            "shapes-clip", "2", metric="eval/suite/average", metrics_of=lambda v: {"eval/suite/average": 0.5 + int(v) / 10},
            confidence=0.95, samples_of=samples_of,
        )  # fmt: skip
