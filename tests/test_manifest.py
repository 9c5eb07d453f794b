"""The manifest people query: typed score columns, the content hash a function of the verdicts alone,
and the docs' example run on a real curation."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import clipforge
from clipforge.core.storage import Store
from clipforge.core.validation import load_recipe
from clipforge.engine.curation import curate
from tests.crawls import planted_crawl, write_shards

DOCS = Path(__file__).resolve().parents[1] / "docs" / "curation.md"
CAPTIONS = ["a cat", "a red car parked in the old town square", "東京の夜", "x", "two dogs playing in the snow together"]


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("manifest")
    samples, _ = planted_crawl([3, 6], singles=20, seed=9, captions=CAPTIONS)
    urls = write_shards(tmp / "crawl", samples, per_shard=8)
    recipe = load_recipe({
        "name": "query", "storage": {"root": str(tmp / "store")},
        "data": {"train": {"type": "webdataset", "urls": urls}},
        "curation": [{"type": "caption-length", "min_words": 2}, {"type": "near-duplicates", "threshold": 0.95}],
        "model": {"type": "open-clip", "arch": "RN50"}, "parallel": {"shard_size": 5},
    })  # fmt: skip
    store = Store(recipe.storage.root)
    summary = curate(recipe, clipforge.get_plugin_manager().catalog, store, "cur", progress=False)
    return summary, store, samples


def test_scores_are_float_columns_null_where_a_step_did_not_score(curated):
    summary, store, samples = curated
    table = pq.read_table(store.path(summary.manifest))
    assert table.column_names[:6] == ["key", "kept", "step", "reason", "detail", "shard"]
    scores = table.column_names[6:]
    assert set(scores) == {"caption-length/words", "caption-length/chars", "near-duplicates/similarity"}
    assert all(table.schema.field(name).type == pa.float64() for name in scores)
    rows = {r["key"]: r for r in table.to_pylist()}
    assert len(rows) == len(samples) == summary.input
    for s in samples:
        row = rows[s.key]
        assert row["caption-length/words"] == len(s.caption.split())  # every sample reached the caption filter
        if row["reason"] == "near duplicate":
            assert row["near-duplicates/similarity"] >= 0.95
        else:  # kept, or dropped before near-duplicates: it has no similarity
            assert row["near-duplicates/similarity"] is None
    assert table.schema.metadata[b"clipforge.format"] == b"3"


def test_the_content_hash_is_a_function_of_the_verdicts(curated):
    summary, store, _ = curated
    table = pq.read_table(store.path(summary.manifest), columns=["key", "kept", "step", "reason"]).to_pylist()
    digest = hashlib.sha256()
    for r in table:
        digest.update(f"{r['key']}\t{r['kept']}\t{r['step']}\t{r['reason']}\n".encode())
    for shard in summary.shards:
        digest.update(shard.sha256.encode())
    assert digest.hexdigest() == summary.content_hash


def test_the_docs_example_filters_and_plots_the_manifest(curated, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    summary, store, _ = curated
    # the example finds the demo's manifest under the working directory: this store stands there
    curations = tmp_path / "cwd" / "clipforge-demo" / "clipforge-store" / "curated"
    curations.mkdir(parents=True)
    (curations / "query").symlink_to(Path(store.path(summary.manifest)).parent)
    monkeypatch.chdir(tmp_path / "cwd")
    text = DOCS.read_text()
    (code,) = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "read_parquet(MANIFEST)" in b]
    namespace = {"MANIFEST": store.path(summary.manifest)}
    exec(compile(code, "docs/curation.md", "exec"), namespace)
    manifest, reasons = namespace["manifest"], namespace["top_reasons"]
    assert len(manifest) == summary.input and set(namespace["short"].reason) <= {"too few words (1 < 2)", ""}
    assert (namespace["copies"]["near-duplicates/similarity"] >= 0.95).all() and len(namespace["copies"]) > 0
    assert reasons.pairs.sum() == summary.input - summary.kept
    assert dict(zip(reasons.reason, reasons.pairs)) == {r: n for v in summary.funnel.values() for r, n in v.reasons.items()}
