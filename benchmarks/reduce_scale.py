"""The reduce phase in partitions: time and peak memory per task against the number of partitions.

    python benchmarks/reduce_scale.py [--sizes 1000000 2000000 4000000] [--partitions 1 4 16 64]
                                      [--part-rows 100000] [--threshold 0.97]
                                      [--cluster-rows 2000] [--max-spread 2.0]

For each size N: N synthetic 256-d float16 features (clustered as image embeddings are: 1 cluster per
``--cluster-rows`` rows, the clusters' centres random directions, so nearly orthogonal; rows at
cosine ~0.8 of their centre, 5 % of them near copies of another row at cosine ~0.99) written to a store as curation's parts leave them (``--part-rows`` survivors a part), then
the ``near-duplicates`` step's reduce phase run with ``parallel.reduce_partitions`` = each of
``--partitions`` (1: the one-process decision). Every task runs in this process, one after the
other, under ``tracemalloc``: its wall time and its peak of traced memory (numpy's arrays included)
are what a worker of a cluster would need. Prints, per (N, partitions): the kept count (the same for
every number of partitions), the total time, the largest time and peak memory of a task of each kind
(survey, route, link, decide: the kinds every partitioned step runs), the features' size divided by
the partitions, and the largest task's peak against it; the one-process row gives the decision's
peak. Each row also gives, for each k-means fitted, its cells and their spread: the mean number of
partitions a sampled row goes to (cells are refitted, four times more, while it is above
``--max-spread``; ``inf`` keeps the sqrt(N) cells of the first fit). The process's peak resident
memory (``ru_maxrss``) is printed at the end, for the whole run.
"""

from __future__ import annotations

import argparse
import collections
import io
import resource
import tempfile
import time
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import clipforge
from clipforge.core.storage import Store
from clipforge.engine.curation.layout import PART_MANIFEST, features_of, part_dir
from clipforge.engine.curation.parts import PartResult
from clipforge.engine.curation.plan import build_steps
from clipforge.engine.curation.reduce import reduce
from clipforge.plugins.curation.duplicates import NearDuplicates

DIM = 256


def features(n: int, cluster_rows: int = 2000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // cluster_rows), DIM), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.empty((n, DIM), dtype=np.float16)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        rows = centres[rng.integers(0, len(centres), m)] + 0.75 * rng.standard_normal((m, DIM), dtype=np.float32) / np.sqrt(DIM)
        copies = rng.random(m) < 0.05
        source = rng.integers(0, m, int(copies.sum()))
        rows[copies] = rows[source] + 0.1 * rng.standard_normal((len(source), DIM), dtype=np.float32) / np.sqrt(DIM)
        x[start : start + m] = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float16)
    return x


def write_parts(store: Store, out: str, x: np.ndarray, part_rows: int) -> list[PartResult]:
    parts = []
    for i, start in enumerate(range(0, len(x), part_rows)):
        chunk = x[start : start + part_rows]
        keys = [f"k{start + j:010d}" for j in range(len(chunk))]
        buf = io.BytesIO()
        pq.write_table(pa.table({"key": keys, "kept": [True] * len(keys)}), buf)
        store.write_bytes(f"{part_dir(out, i)}/{PART_MANIFEST}", buf.getvalue())
        buf = io.BytesIO()
        np.save(buf, chunk, allow_pickle=False)
        store.write_bytes(f"{features_of(out, i, 'near-duplicates')}.npy", buf.getvalue())
        parts.append(PartResult(index=i, input=len(chunk), kept=len(chunk), funnel={}, seconds=0.0))
    return parts


class Measured:
    """The builtin map, each call timed and its traced memory peak taken."""

    def __init__(self) -> None:
        self.tasks: dict[str, list[tuple[float, int]]] = collections.defaultdict(list)

    def __call__(self, fn, jobs):
        for job in jobs:
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            start = time.perf_counter()
            result = fn(job)
            self.tasks[fn.__name__].append((time.perf_counter() - start, tracemalloc.get_traced_memory()[1] - base))
            yield result


def run(n: int, partitions: int, part_rows: int, threshold: float, x: np.ndarray, folder: str) -> dict:
    recipe = clipforge.load_recipe({
        "name": "bench", "storage": {"root": folder},
        "data": {"train": {"type": "webdataset", "urls": "unused-{0..1}.tar"}},
        "curation": [{"type": "near-duplicates", "threshold": threshold}],
        "model": {"type": "open-clip", "arch": "RN50"},
        "parallel": {"reduce_partitions": partitions},
    })  # fmt: skip
    store = Store(folder)
    out = f"p{partitions}"
    parts = write_parts(store, out, x, part_rows)
    steps = build_steps(recipe, clipforge.get_plugin_manager().catalog)
    mapper = Measured()
    plans: list[tuple[dict, bool]] = []
    planned = NearDuplicates.plan

    def plan(self, *args):  # the last plan says how many cells were fitted and how far a row spread
        plans.append(result := planned(self, *args))
        return result

    NearDuplicates.plan = plan  # type: ignore[method-assign]
    tracemalloc.start()
    start = time.perf_counter()
    reduced = reduce(steps, store, out, parts, recipe=recipe, mapper=mapper)
    total = time.perf_counter() - start
    whole_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    NearDuplicates.plan = planned  # type: ignore[method-assign]
    # each fit's cells and spread: a refit's plan holds the fit before it, the last plan the last fit
    fits = [(p["fit"]["cells"], p["fit"]["spread"]) for p, done in plans if not done and "fit" in p]
    if plans and "centroids" in plans[-1][0]:
        fits.append((len(plans[-1][0]["centroids"]), plans[-1][0]["spread"]))
    return {"kept": reduced.kept, "seconds": total, "peak": whole_peak, "tasks": dict(mapper.tasks), "fits": fits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 2_000_000, 4_000_000])
    parser.add_argument("--partitions", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--part-rows", type=int, default=100_000)
    parser.add_argument("--threshold", type=float, default=0.97)
    parser.add_argument("--cluster-rows", type=int, default=2000, help="rows a cluster of the features")
    parser.add_argument(
        "--max-spread",
        type=float,
        default=NearDuplicates.MAX_SPREAD,
        help="NearDuplicates.MAX_SPREAD (inf: the cells sqrt(N) gives, never refitted)",
    )
    args = parser.parse_args()
    NearDuplicates.MAX_SPREAD = args.max_spread
    print(
        f"features: 256-d float16, {args.cluster_rows:,} rows a cluster; threshold {args.threshold}; parts of "
        f"{args.part_rows:,} rows; MAX_SPREAD {args.max_spread}; every task in this process, one after the other"
    )
    mib = 1 << 20
    kinds = {"survey_block": "survey", "route_block": "route", "link_partition": "link", "decide_block": "decide"}
    print("| pairs | partitions | kept | total s | " + " | ".join(f"{k} s / MiB" for k in kinds.values())
          + " | data / partitions MiB | largest peak / (data / partitions) | cells: spread |")  # fmt: skip
    print("|---:|---:|---:|---:|" + "---:|" * len(kinds) + "---:|---:|---:|")
    for n in args.sizes:
        x = features(n, args.cluster_rows)
        for p in args.partitions:
            with tempfile.TemporaryDirectory() as folder:
                r = run(n, p, args.part_rows, args.threshold, x, folder)
            share = x.nbytes / p
            if p == 1:
                cells = " | ".join(["(one process)"] + ["" for _ in range(len(kinds) - 1)])
                print(f"| {n:,} | 1 | {r['kept']:,} | {r['seconds']:.1f} | {cells} | {share / mib:.0f} | "
                      f"{r['peak'] / share:.1f} ({r['peak'] / mib:,.0f} MiB) |", flush=True)  # fmt: skip
                continue
            columns, largest = [], 0
            for fn in kinds:
                tasks = r["tasks"].get(fn, [])
                t, m = max((t for t, _ in tasks), default=0.0), max((m for _, m in tasks), default=0)
                largest = max(largest, m)
                columns.append(f"{t:.1f} / {m / mib:,.0f}")
            fitted = ", ".join(f"{c:,}: {s:.2f}" for c, s in r["fits"])
            print(f"| {n:,} | {p} | {r['kept']:,} | {r['seconds']:.1f} | {' | '.join(columns)} | {share / mib:.0f} | "
                  f"{largest / share:.1f} | {fitted} |", flush=True)  # fmt: skip
    print(f"peak resident memory of the whole run: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")


if __name__ == "__main__":
    main()
