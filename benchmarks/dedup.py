"""Near-duplicates at scale: clipforge's range search against an exact flat search, on the same vectors.

    python benchmarks/dedup.py [--n 100000] [--large 1000000] [--threshold 0.97]

N random 256-d unit embeddings, stored in float16 as curation's parts store them, with planted
groups of near copies of varied sizes (2 to 500; pairwise cosines around the threshold, so some
links of a group fall below it, as in real data). Prints:

- at ``--n``: the pairs at or above the threshold that an exact flat search finds (FAISS
  ``IndexFlatIP.range_search``, every pair compared), the share of them each of the step's searches
  finds (``search: index``, the inverted-file index; ``search: exact``, the cells of the partitioned
  decision: recall 1, but random vectors are spread evenly over the sphere, where its cells prune
  little: see ``reduce_scale.py`` for clustered ones) and its time against the flat search's; and,
  over the groups the exact pairs make, how many groups the decision (``--search``) keeps exactly one of;
- at ``--large``: the time of the whole decision (``NearDuplicates.decide``: range search, groups,
  verdicts) and how it grows from ``--n``.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

SIZES = (2, 3, 5, 10, 20, 50, 200, 500)


def planted(n: int, d: int = 256, share: float = 0.05, seed: int = 0) -> np.ndarray:
    """Unit rows in float16; about ``share`` of them in groups of near copies of sizes ``SIZES``, shuffled."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d), dtype=np.float32)
    row = 0
    while row < share * n:
        size = min(int(rng.choice(SIZES)), n - row)
        # copy = centre + noise: pairwise cosine ~ 1 / (1 + d sigma^2), from ~0.96 to ~0.995
        sigma = rng.uniform(0.0045, 0.0125)
        centre = x[row] / np.linalg.norm(x[row])
        x[row : row + size] = centre + sigma * rng.standard_normal((size, d), dtype=np.float32)
        row += size
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x[rng.permutation(n)].astype(np.float16)


def exact_pairs(x: np.ndarray, threshold: float, batch: int = 4096) -> np.ndarray:
    """Every pair i < j with inner product >= threshold, by comparing every pair (a flat index), as keys i * n + j."""
    import faiss

    n = len(x)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    found = []
    for start in range(0, n, batch):
        limits, _, ids = index.range_search(x[start : start + batch], threshold - 1e-3)
        queries = np.repeat(np.arange(start, start + len(limits) - 1, dtype=np.int64), np.diff(limits).astype(np.int64))
        keep = queries < ids
        found.append(queries[keep] * n + ids[keep])
    pairs = np.concatenate(found)
    i, j = pairs // n, pairs % n
    return pairs[np.einsum("ij,ij->i", x[i], x[j]) >= threshold]  # the same float32 products clipforge keeps on


def groups_kept_once(x: np.ndarray, pairs: np.ndarray, kept: np.ndarray) -> tuple[int, int]:
    """Of the groups (connected components) the exact pairs make, how many keep exactly one member; and how many there are."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(x)
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs // n, pairs % n)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    sizes = np.bincount(component)
    kept_per = np.bincount(component, weights=kept.astype(np.float64), minlength=len(sizes))
    groups = sizes > 1
    return int((kept_per[groups] == 1).sum()), int(groups.sum())


def decide(x: np.ndarray, threshold: float, search: str) -> tuple[float, np.ndarray]:
    from clipforge.plugins.curation.duplicates import NearDuplicates

    step = NearDuplicates(threshold=threshold, search=search)
    keys = [str(i) for i in range(len(x))]
    start = time.perf_counter()
    verdicts = step.decide(keys, x.astype(np.float32))  # as the reduce phase hands them
    return time.perf_counter() - start, np.array([v.keep for v in verdicts])


def main() -> None:
    import faiss

    from clipforge.plugins.curation.duplicates import EXACT_BELOW, indexed_pairs, near_pairs

    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--large", type=int, default=1_000_000)
    p.add_argument("--threshold", type=float, default=0.97)
    p.add_argument("--search", choices=["exact", "index"], default="index", help="the step's search for the decisions")
    p.add_argument("--skip-exact", action="store_true", help="leave out the exact search by cells (slow on random vectors)")
    args = p.parse_args()
    threads = faiss.omp_get_max_threads()
    print(f"settings: {threads} FAISS threads ({os.cpu_count()} CPUs), 256-d float16 embeddings, threshold {args.threshold}, "
          f"groups of {', '.join(map(str, SIZES))} near copies (~5 % of rows), exact search below {EXACT_BELOW:,} rows")  # fmt: skip

    x = planted(args.n)
    x32 = x.astype(np.float32)
    start = time.perf_counter()
    truth = exact_pairs(x32, args.threshold)
    flat = time.perf_counter() - start
    print(f"{args.n:>9,} rows: exact flat search {flat:7.1f} s, {len(truth):,} pairs >= {args.threshold}")
    searches = [("index", indexed_pairs, "target 0.99")] + ([] if args.skip_exact else [("exact", near_pairs, "target 1")])
    for name, search, target in searches:
        start = time.perf_counter()
        i, j, _ = search(x32, args.threshold)
        ours = time.perf_counter() - start
        recall = np.isin(truth, i * args.n + j).mean()
        print(f"{'':>9}        search: {name:<5} {ours:7.2f} s, {len(i):,} pairs: recall {recall:.4f} ({target}), "
              f"{flat / ours:.2f}x the speed of the flat search")  # fmt: skip
    small, kept = decide(x, args.threshold, args.search)
    once, groups = groups_kept_once(x, truth, kept)
    print(f"{'':>9}        whole decision {small:7.2f} s; {once:,} of the {groups:,} exact groups keep exactly one image")

    if args.large:
        del x, x32, truth
        big = planted(args.large, seed=1)
        large, kept = decide(big, args.threshold, args.search)
        print(f"{args.large:>9,} rows: whole decision {large:7.1f} s, {int((~kept).sum()):,} dropped; "
              f"{large / small:.1f}x the time of {args.n:,} for {args.large / args.n:.0f}x the rows")  # fmt: skip


if __name__ == "__main__":
    main()
