"""Crawl damage, generated: every input sample of every shard has exactly one manifest row (kept, or
dropped with its reason), however the shards are damaged, split into parts and curated by workers."""

from __future__ import annotations

import collections
import posixpath
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import clipforge
from clipforge.core.storage import Store
from clipforge.core.validation import load_recipe
from clipforge.engine.curation import curate
from clipforge.engine.shards import iter_shard
from clipforge.plugins.datasets.webdataset import safe_key
from tests.broken_inputs import KEPT, Entry, build, sample_entries

# keys that differ from one another only in characters a curated key cannot hold, or in case,
# or in their Unicode normalization form (é composed, e + combining accent)
SUFFIXES = ["", " x", ":x", "?x", "#x", "\\x", "/x", "X", "x", "\u00e9", "e\u0301", " \u6771\u4eac"]
#: sample kinds that hold an image and a caption: their key's sample is whole once read
WHOLE = ("good", "upper-ext", "empty-caption", "undecodable")
REASONS = {
    "good": KEPT,
    "upper-ext": KEPT,
    "empty-caption": "empty caption",
    "undecodable": "undecodable image",
    "no-image": "no image",
    "odd-ext": "no image",
    "no-caption": "missing caption",
}
KIND = st.sampled_from([*REASONS, "dup-adjacent", "dup-apart"])


def members(kind: str, key: str, seed: int) -> list[Entry]:
    image, text, side = sample_entries(key, seed)
    if kind == "upper-ext":
        return [Entry(f"{key}.JPG", image.data), text, side]
    if kind == "empty-caption":
        return [image, Entry(f"{key}.txt", " \t\n\u200b".encode()), side]
    if kind == "undecodable":
        return [Entry(f"{key}.jpg", image.data[: len(image.data) // 3]), text, side]
    if kind == "no-image":
        return [text, side]
    if kind == "odd-ext":
        return [Entry(f"{key}.gif", image.data), text, side]
    if kind == "no-caption":
        return [image, side]
    return [image, text, side]


@dataclass
class Shard:
    data: bytes
    expect: list[tuple[str, str | None]]  # each input sample's row: its key and reason (KEPT: kept)

    def __repr__(self) -> str:
        return f"Shard({len(self.data)} bytes, expect={self.expect!r})"


@st.composite
def sample_shard(draw, index: int, fmt: int) -> Shard:
    """A shard of samples of every kind: duplicate keys (adjacent, apart), keys that differ only in unsafe characters."""
    raws = draw(st.lists(st.tuples(st.integers(0, 2), st.sampled_from(SUFFIXES)), min_size=0, max_size=7, unique=True))
    entries: list[Entry] = []
    specs: list[tuple[str, str]] = []  # (kind, raw key), in order
    firsts: list[int] = []  # the index in ``entries`` of each spec's first member
    for j, s in raws:
        kind = draw(KIND)
        raw = f"s{index}-{j}{s}"
        if kind == "dup-adjacent":
            if not specs or specs[-1][0] not in WHOLE:
                kind = "good"
            else:
                raw = specs[-1][1]
        elif kind == "dup-apart":
            earlier = [r for n, (k, r) in enumerate(specs) if k in (*WHOLE, "no-caption") and n < len(specs) - 1]
            earlier = [r for r in earlier if specs[-1][1] != r]
            if not earlier:
                kind = "good"
            else:
                raw = draw(st.sampled_from(earlier))
        firsts.append(len(entries))
        entries += members("good" if kind.startswith("dup") else kind, raw, len(entries))
        specs.append((kind, raw))
    built = build(entries, fmt)
    expect: list[tuple[str, str | None]] = []
    for (kind, raw), first in zip(specs, firsts):
        key = safe_key(raw)
        if kind == "dup-adjacent":
            expect.append((f"{key}@{built.starts[first]}", "duplicate key in shard"))
        elif kind == "dup-apart":
            expect.append((f"{key}@{built.starts[first]}", "key repeated after other keys"))
        else:
            expect.append((key, REASONS[kind]))
    return Shard(built.data, expect or [(f"{index:05d}.tar@0", "empty shard")])


@st.composite
def crawl_shard(draw, index: int) -> Shard:
    fmt = draw(st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT]))
    kind = draw(st.sampled_from(["samples", "samples", "samples", "zero-bytes", "empty-archive", "not-a-tar", "truncated"]))
    name = f"{index:05d}.tar"
    if kind == "samples":
        return draw(sample_shard(index, fmt))
    if kind == "zero-bytes":
        return Shard(b"", [(f"{name}@0", "empty shard")])
    if kind == "empty-archive":
        return Shard(build([], fmt).data, [(f"{name}@0", "empty shard")])
    if kind == "not-a-tar":
        page = b"<html><body>503 Service Unavailable</body></html>\n" * draw(st.integers(1, 40))
        # shorter than one tar block it ends inside the first header
        return Shard(page, [(f"{name}@0", "corrupt tar header" if len(page) >= 512 else "truncated or unreadable shard")])
    # truncated inside the image of one of its samples: those before it are whole, those after gone
    n = draw(st.integers(1, 4))
    cut_at = draw(st.integers(0, n - 1))
    keys = [f"s{index}-{j}" for j in range(n)]
    built = build([e for j, k in enumerate(keys) for e in sample_entries(k, j)], fmt)
    cut = built.headers[3 * cut_at] + 512 + draw(st.integers(1, 200))
    expect = [(k, KEPT) for k in keys[:cut_at]] + [(keys[cut_at], "truncated or unreadable shard")]
    return Shard(built.data[:cut], expect)


@st.composite
def crawls(draw) -> list[Shard]:
    shards = [draw(crawl_shard(i)) for i in range(draw(st.integers(1, 4)))]
    if len(shards) > 1 and draw(st.booleans()):
        # a key of one shard given again in a later one: the later is dropped as a duplicate
        kept = [k for k, r in shards[0].expect if r is KEPT]
        if kept:
            key = kept[0]
            shards.append(Shard(build(sample_entries(key, 7), tarfile.GNU_FORMAT).data, [(key, "duplicate key")]))
    return shards


def _curate(folder, shards: list[Shard], workers: int, shard_size: int):
    folder.mkdir(parents=True)
    urls = []
    for i, shard in enumerate(shards):
        (folder / f"{i:05d}.tar").write_bytes(shard.data)
        urls.append(str(folder / f"{i:05d}.tar"))
    recipe = load_recipe({
        "name": "damage", "storage": {"root": str(folder / "store")},
        "data": {"train": {"type": "webdataset", "urls": urls}},
        "model": {"type": "open-clip", "arch": "RN50"}, "parallel": {"shard_size": shard_size},
    })  # fmt: skip
    store = Store(recipe.storage.root)
    with ThreadPoolExecutor(workers) as pool:
        summary = curate(recipe, clipforge.get_plugin_manager().catalog, store, "out", progress=False, mapper=pool.map)
    return summary, store, pq.read_table(store.path(summary.manifest)).to_pylist(), urls


def check_every_sample_has_one_row(shards: list[Shard], summary, store, rows, urls) -> None:
    by_shard = collections.defaultdict(list)
    for row in rows:
        (url,) = [u for u in urls if row["detail"].startswith((f"{u}@", f"{u}:"))]
        by_shard[url].append(row)
    for shard, url in zip(shards, urls):
        got = sorted((r["key"], None if r["kept"] else r["reason"]) for r in by_shard[url])
        assert len(got) == len(shard.expect), (url, got, shard.expect)
        for (key, reason), (row_key, row_reason) in zip(sorted(shard.expect, key=lambda e: e[0]), sorted(got)):
            assert row_key == key, (url, got, shard.expect)
            assert (row_reason is None) if reason is KEPT else (row_reason or "").startswith(reason), (url, key, row_reason)
    assert len(rows) == summary.input == sum(len(s.expect) for s in shards)
    # distinct keys: only a key given again in another part repeats, in its drop row
    counts = collections.Counter(r["key"] for r in rows)
    assert all(r["reason"] == "duplicate key" for r in rows if counts[r["key"]] > 1 and not r["kept"])
    assert all(sum(r["kept"] for r in rows if r["key"] == k) <= 1 for k in counts)
    assert all(r["step"] and r["reason"] for r in rows if not r["kept"])
    # every kept row is in the curated shards exactly once, in the shard its row names
    kept = sorted((r["key"], r["shard"]) for r in rows if r["kept"])
    curated = sorted((s["key"], shard.path) for shard in summary.shards for s in iter_shard(store, shard.path))
    assert curated == kept and summary.kept == len(kept)
    for row in rows:  # a key made safe names the key as read; every kept key is one a curated shard can hold
        if row["kept"]:
            assert re.fullmatch(r"[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*", row["key"]), row


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(shards=crawls(), workers=st.integers(1, 3), shard_size=st.sampled_from([1, 2, 5]))
def test_every_sample_of_a_damaged_crawl_has_exactly_one_row(tmp_path_factory, shards, workers, shard_size):
    folder = tmp_path_factory.mktemp("crawl")
    summary, store, rows, urls = _curate(folder / "c", shards, workers, shard_size)
    check_every_sample_has_one_row(shards, summary, store, rows, urls)


def test_keys_that_differ_only_in_unsafe_characters_stay_apart_with_the_key_as_read(tmp_path):
    raws = ["a b", "a_b", "a:b", "a?b", "a#b", "a\\b", "caf\u00e9", "cafe\u0301", "A", "a", "a/b"]
    shard = Shard(build([e for i, k in enumerate(raws) for e in sample_entries(k, i)], tarfile.PAX_FORMAT).data, [])
    summary, _, rows, _ = _curate(tmp_path / "c", [shard], 1, 100)
    assert len(rows) == len(raws) == summary.kept and len({r["key"] for r in rows}) == len(raws)
    by_detail = {raw: [r for r in rows if f"(key {raw!r})" in r["detail"]] for raw in raws}
    assert all(len(found) == 1 for raw, found in by_detail.items() if safe_key(raw) != raw)
    assert {r["key"] for r in rows} >= {"a_b", "A", "a", "a/b"}  # keys already safe stay as they are


@pytest.mark.parametrize("data", [b"", bytes(1024), bytes(10240)], ids=["zero-bytes", "end-marker", "padding"])
def test_an_empty_shard_among_others_is_a_row_naming_it(tmp_path, data):
    good = Shard(build(sample_entries("k", 1), tarfile.GNU_FORMAT).data, [("k", KEPT)])
    summary, _, rows, urls = _curate(tmp_path / "c", [good, Shard(data, [("00001.tar@0", "empty shard")]), good], 2, 2)
    (empty,) = [r for r in rows if r["reason"] == "empty shard"]
    assert empty["key"] == "00001.tar@0" and empty["detail"].startswith(f"{urls[1]}: ")
    assert empty["detail"].endswith(": 0 bytes" if not data else f"of {len(data)} bytes with no members")
    assert posixpath.basename(urls[1]) in empty["key"] and summary.input == 3
