"""The paired bootstrap: is model B better than model A on the same samples, beyond noise?

With per-sample results of both models (:class:`~clipforge.PerSample`) on the samples both were
measured on, draw ``resamples`` seeded resamples of those samples with replacement, recompute
each model's metric on every resample, and take the ``(1 - c) / 2`` and ``(1 + c) / 2`` quantiles
of the difference as its interval at confidence ``c`` (Efron). Metrics that are not plain means
over samples (mean per-class recall: ``groups``) are recomputed on each resample, not averaged.
The same draws serve any number of models (:func:`resampled`), so that a statistic of several, the
drop of a domain's accuracy from its best over a sequence of retrains, has an interval too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipforge.core.components import PerSample

#: Resamples drawn by default (the standard test uses at least 1,000).
RESAMPLES = 2000
#: Floats held at once while resampling: bounds the memory of a large evaluation set.
_CELLS = 1 << 22


@dataclass(frozen=True)
class Interval:
    """``delta`` (B - A on the common samples), its interval ``[low, high]`` at ``confidence``, over ``n`` samples."""

    delta: float
    low: float
    high: float
    confidence: float
    n: int
    resamples: int

    def describe(self) -> str:
        return f"{self.delta:+.4g} [{self.low:+.4g}, {self.high:+.4g}] at {self.confidence:g} over {self.n} samples"

    def as_dict(self) -> dict[str, Any]:
        return {
            "delta": self.delta, "low": self.low, "high": self.high, "confidence": self.confidence,
            "n": self.n, "resamples": self.resamples,
        }  # fmt: skip


def per_sample_from(data: dict[str, Any]) -> PerSample:
    """A :class:`PerSample` from its JSON form (:meth:`PerSample.as_dict`)."""
    return PerSample(
        keys=[str(k) for k in data["keys"]],
        values=[float(v) for v in data["values"]],
        weights=None if data.get("weights") is None else [float(w) for w in data["weights"]],
        groups=None if data.get("groups") is None else [int(g) for g in data["groups"]],
    )


def metric_value(record: PerSample) -> float:
    """The metric that ``record`` holds per sample, computed on all of them."""
    values, weights, groups = _arrays(record)
    return float(_metric(np.ones((1, len(values))), values, weights, groups)[0])


def paired_interval(a: PerSample, b: PerSample, confidence: float, *, resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """The interval of ``metric(b) - metric(a)`` on the samples both have (by key), by a seeded paired bootstrap."""
    full, spread = resampled([a, b], resamples=resamples, seed=seed)
    low, high = quantile_bounds(spread[:, 1] - spread[:, 0], confidence)
    n = len(set(a.keys) & set(b.keys))
    return Interval(float(full[1] - full[0]), low, high, confidence, n, resamples)


def quantile_bounds(statistic: np.ndarray, confidence: float) -> tuple[float, float]:
    """The ``(1 - c) / 2`` and ``(1 + c) / 2`` quantiles of a statistic over the resamples: its interval at ``c``."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, not {confidence}")
    low, high = np.quantile(statistic, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


def resampled(records: Sequence[PerSample], *, resamples: int = RESAMPLES, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Each record's metric on the samples all of them have (by key, in the first one's order), and on
    each of ``resamples`` seeded resamples of those samples, the same draws for every record (paired):
    ``(metrics of shape (k,), resampled metrics of shape (resamples, k))`` for ``k`` records. A
    statistic of several measurements of the same samples (a drop from the best of several models)
    takes its interval from the rows of the second."""
    if not records:
        raise ValueError("no per-sample results to resample")
    shared = set(records[0].keys).intersection(*(r.keys for r in records[1:]))
    keys = [k for k in records[0].keys if k in shared]
    if not keys:
        raise ValueError(f"the {len(records)} models' per-sample results share no sample key")
    columns = []
    for record in records:
        index = {k: i for i, k in enumerate(record.keys)}
        columns.append(_take(_arrays(record), np.array([index[k] for k in keys])))
    n = len(keys)
    full = np.array([_metric(np.ones((1, n)), *column)[0] for column in columns])
    rng = np.random.default_rng(seed)
    spreads = []
    step = max(1, _CELLS // n)
    for start in range(0, resamples, step):
        # how often each sample is drawn in each resample: the same draws for every record
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=min(step, resamples - start)).astype(np.float64)
        spreads.append(np.stack([_metric(counts, *column) for column in columns], axis=1))
    return full, np.concatenate(spreads)


def _arrays(record: PerSample) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    values = np.asarray(record.values, dtype=np.float64)
    weights = None if record.weights is None else np.asarray(record.weights, dtype=np.float64)
    groups = None if record.groups is None else np.asarray(record.groups, dtype=np.int64)
    return values, weights, groups


def _take(
    arrays: tuple[np.ndarray, np.ndarray | None, np.ndarray | None], index: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    values, weights, groups = arrays
    return values[index], None if weights is None else weights[index], None if groups is None else groups[index]


def _metric(counts: np.ndarray, values: np.ndarray, weights: np.ndarray | None, groups: np.ndarray | None) -> np.ndarray:
    """The metric on each resample (a row of ``counts``: how often each sample is drawn)."""
    mass = counts if weights is None else counts * weights
    if groups is None:
        total = mass.sum(axis=1)
        return np.divide((mass * values).sum(axis=1), total, out=np.full(len(counts), np.nan), where=total > 0)
    onehot = np.zeros((len(values), int(groups.max()) + 1))
    onehot[np.arange(len(values)), groups] = 1.0
    sums, sizes = (mass * values) @ onehot, mass @ onehot
    present = sizes > 0
    means = np.divide(sums, sizes, out=np.zeros_like(sums), where=present)
    return means.sum(axis=1) / np.maximum(present.sum(axis=1), 1)
