"""What a curation leaves on the store, in one place: its folder's files, each part's files, the
format version, and the Parquet and feature files' readers and writers.

A curation's folder ``out`` holds the curated shards, :data:`MANIFEST`, :data:`SUMMARY` (written
last: it marks a complete curation), :data:`FEATURES_INDEX`, the reduce phase's :data:`REDUCED` and
:data:`SCORES`, and ``parts/part-NNNNNN/`` for each part (:func:`part_dir`): its :data:`PART_MANIFEST`,
its staged survivors (:data:`STAGED`), the whole-dataset steps' features (:func:`features_of`),
:data:`PART_DONE` and :data:`PART_FINAL`.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from clipforge.core.errors import ConfigError
from clipforge.core.storage import Store

# 3: shards read past damage, images turned upright by EXIF, invisible captions dropped, an index
# of every curated shard's sample offsets, typed score columns in the manifest, features.json beside it
FORMAT_VERSION = 3
#: The first step of every funnel: reading and checking the raw sample (the manifest's ``step`` of what it drops).
DECODE_STEP = "decode"

MANIFEST = "manifest.parquet"
SUMMARY = "summary.json"
#: Beside each manifest: what the pool of a later curation needs to read this one's features.
FEATURES_INDEX = "features.json"
#: The whole-dataset decisions.
REDUCED = "reduce.json"
#: The whole-dataset steps' scores of every survivor, by position: its key, then one float column per ``<step>/<score>``.
SCORES = "reduce-scores.parquet"
#: A part's files: its manifest rows, its survivors as a tar shard, its result, the list of its curated shards.
PART_MANIFEST = "manifest.parquet"
STAGED = "staged.tar"
PART_DONE = "done.json"
PART_FINAL = "final.json"
#: A part's manifest columns besides the scores: each ``<step>/<score>`` name is a float column of its own.
MANIFEST_COLUMNS = ("key", "kept", "step", "reason", "detail")
#: The curation's manifest: a part's columns and each kept pair's shard, with their Arrow types; each ``<step>/<score>`` name follows
#: as a float64 column, null where absent.
MANIFEST_SCHEMA = [("key", "string"), ("kept", "bool_"), ("step", "string"), ("reason", "string"), ("detail", "string"),
                   ("shard", "string")]  # fmt: skip


def part_dir(out: str, index: int) -> str:
    return f"{out}/parts/part-{index:06d}"


def features_of(out: str, index: int, label: str) -> str:
    """Where part ``index`` keeps step ``label``'s features, less the suffix (:func:`save_features` picks it)."""
    return f"{part_dir(out, index)}/features-{label}"


def curated_shard(out: str, index: int, n: int) -> str:
    """Part ``index``'s ``n``-th curated shard."""
    return f"{out}/shard-{index:06d}-{n:03d}.tar"


def curation_folder(manifest: str, where: str) -> tuple[str, str]:
    """The store root and the curation's folder of a curated manifest's URI; ``where`` names the
    recipe field for the error."""
    root, out, name = (["", *manifest.rsplit("/", 2)])[-3:]
    if name != MANIFEST or not out:
        raise ConfigError(f"{where}: {manifest} is not a curated manifest (.../<curation>/{MANIFEST})")
    return root or ".", out


def score_columns(scores: list[dict[str, float]]) -> dict[str, list[float | None]]:
    """One column per score name, in name order, None where a row has no such score."""
    names = sorted({name for row in scores for name in row})
    return {name: [row.get(name) for row in scores] for name in names}


def write_parquet(store: Store, rel: str, columns: dict[str, list[Any]]) -> None:
    """A table of ``columns``; score columns (any name with a ``/``) are float64 even when all null."""
    import pyarrow as pa

    write_table(store, rel, pa.table({k: pa.array(v, type=pa.float64() if "/" in k else None) for k, v in columns.items()}))


def write_table(store: Store, rel: str, table: Any) -> None:
    """An Arrow ``table`` as Parquet at ``rel``, written atomically by the store."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    store.write_bytes(rel, buf.getvalue())


def save_features(store: Store, rel: str, values: list[Any]) -> None:
    """Arrays as a float16 .npy (compact, no pickle), anything else as JSON."""
    if values and isinstance(values[0], np.ndarray):
        buf = io.BytesIO()
        np.save(buf, np.stack(values).astype(np.float16), allow_pickle=False)
        store.write_bytes(f"{rel}.npy", buf.getvalue())
    else:
        store.write_json(f"{rel}.json", values)


def load_features(store: Store, rel: str) -> Any:
    if store.exists(f"{rel}.npy"):
        return np.load(io.BytesIO(store.read_bytes(f"{rel}.npy")), allow_pickle=False)
    return store.read_json(f"{rel}.json") if store.exists(f"{rel}.json") else []


def survivor_keys(store: Store, out: str, n_parts: int) -> list[str]:
    """The keys of every part's survivors, part after part: the order the whole-dataset steps decide in."""
    return [k for i in range(n_parts) for k in part_survivor_keys(store, out, i)]


def part_survivor_keys(store: Store, out: str, index: int) -> list[str]:
    """The keys of part ``index``'s survivors, in order."""
    import pyarrow.parquet as pq

    table = pq.read_table(store.open(f"{part_dir(out, index)}/{PART_MANIFEST}"), columns=["key", "kept"])
    return [k for k, kept in zip(table.column("key").to_pylist(), table.column("kept").to_pylist()) if kept]


def survivor_features(store: Store, out: str, n_parts: int, label: str, index: np.ndarray) -> Any:
    """The features step ``label`` computed for the survivors at positions ``index``: a float32 array or a list."""
    features: list[Any] = []
    for i in range(n_parts):
        values = load_features(store, features_of(out, i, label))
        features.extend(values if not isinstance(values, np.ndarray) else list(values))
    chosen = [features[j] for j in index]
    if chosen and isinstance(chosen[0], np.ndarray):
        return np.stack(chosen).astype(np.float32)
    return chosen


def part_score_names(store: Store, out: str, index: int) -> list[str]:
    """The score columns of part ``index``'s manifest."""
    import pyarrow.parquet as pq

    with store.open(f"{part_dir(out, index)}/{PART_MANIFEST}") as f:
        return [n for n in pq.read_schema(f).names if n not in MANIFEST_COLUMNS]


def whole_scores(store: Store, out: str) -> dict[str, list[float | None]]:
    """The whole-dataset steps' scores of every survivor, by position, column by column."""
    import pyarrow.parquet as pq

    columns = pq.read_table(store.open(f"{out}/{SCORES}")).to_pydict()
    del columns["key"]  # the survivor at each position: for people reading the file
    return columns
