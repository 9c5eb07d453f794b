"""The corpus of broken inputs (tests/broken_inputs.py) through curation, validation and the command line."""

from __future__ import annotations

import collections
import io
import posixpath
import re
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

import clipforge
from clipforge.core.storage import Store
from clipforge.core.validation import load_recipe
from clipforge.engine.curation import curate
from tests.broken_inputs import KEPT, Entry, ShardCase, build, cli_cases, jpeg, shard_cases, table_cases


def write_crawl(folder, cases: list[ShardCase]) -> list[str]:
    """The cases' shards laid out as img2dataset writes them (``00000.tar`` with ``00000.parquet`` and
    ``00000_stats.json`` beside it); the shard paths, in order."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    urls = []
    for i, case in enumerate(cases):
        (folder / f"{i:05d}.tar").write_bytes(case.data)
        (folder / f"{i:05d}_stats.json").write_text(json.dumps({"count": len(case.expect), "case": case.name}))
        (folder / f"{i:05d}.parquet").write_bytes(b"PAR1 not read by curation PAR1")
        urls.append(str(folder / f"{i:05d}.tar"))
    return urls


def curate_shards(tmp_path, cases: list[ShardCase], steps=()):
    """Curate the cases' shards, found by a glob as a recipe for img2dataset output would: the summary,
    the manifest's rows and the shard paths."""
    urls = write_crawl(tmp_path / "crawl", cases)
    recipe = load_recipe(
        {
            "name": "broken",
            "storage": {"root": str(tmp_path / "store")},
            "data": {"train": {"type": "webdataset", "urls": str(tmp_path / "crawl" / "*.tar")}},
            "curation": list(steps),
            "model": {"type": "open-clip", "arch": "RN50"},
        }
    )
    store = Store(recipe.storage.root)
    summary = curate(recipe, clipforge.get_plugin_manager().catalog, store, "out", progress=False)
    return summary, pq.read_table(store.path(summary.manifest)).to_pylist(), urls


def check_accounted(cases: list[ShardCase], rows: list[dict], urls: list[str]) -> None:
    """Every key a shard holds has exactly one row with its expected verdict; a bad one's detail names
    the shard and a byte offset; nothing else is in the manifest but the rows the cases expect."""
    by_key = collections.defaultdict(list)
    for row in rows:
        by_key[row["key"]].append(row)
    expected_rows = 0
    for case, url in zip(cases, urls):
        for key, reason in case.expect.items():
            assert len(by_key[key]) == 1, (case.name, key, by_key[key])
            (row,) = by_key[key]
            if reason is KEPT:
                assert row["kept"], (case.name, key, row)
            else:
                assert not row["kept"] and row["reason"].startswith(reason), (case.name, key, row)
                assert f"{url}@" in row["detail"] or f"{url}:" in row["detail"], (case.name, row)
            assert case.notes.get(key, "") in row["detail"], (case.name, key, row)
        for key, reason in case.extra.items():
            key = posixpath.basename(url) + key if key.startswith("@") else key
            assert len(by_key[key]) == 1, (case.name, key, sorted(k for k in by_key if k.startswith(case.name[:8])))
            assert by_key[key][0]["reason"].startswith(reason) and url in by_key[key][0]["detail"], (case.name, by_key[key])
        expected_rows += len(case.expect) + len(case.extra)
    assert len(rows) == expected_rows


def test_every_key_of_broken_shards_is_accounted_for_once(tmp_path):
    cases = shard_cases()
    assert len(cases) >= 290
    summary, rows, urls = curate_shards(tmp_path, cases)
    check_accounted(cases, rows, urls)
    assert summary.input == len(rows) and summary.kept == sum(r["kept"] for r in rows)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_before_curation(tmp_path, orientation):
    """The curated image stands as the camera meant, whatever the stored pixels' orientation."""
    from clipforge.engine.shards import iter_shard

    raw = jpeg(7, size=(40, 24), orientation=orientation)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(raw))).convert("RGB")
    entries = [Entry("a.jpg", raw), Entry("a.txt", b"a photo taken sideways")]
    case = ShardCase("exif", build(entries, tarfile.GNU_FORMAT).data, {"a": KEPT})
    summary, rows, urls = curate_shards(tmp_path, [case], steps=[{"type": "image-size", "min_side": 1}])
    check_accounted([case], rows, urls)
    (curated,) = [s for shard in summary.shards for s in iter_shard(Store(str(tmp_path / "store")), shard.path)]
    image = Image.open(io.BytesIO(curated["image"]))
    assert image.size == upright.size and image.getexif().get(0x0112) in (None, 1)
    difference = np.abs(np.asarray(image.convert("RGB"), dtype=float) - np.asarray(upright, dtype=float)).mean()
    assert difference < 4  # the same pixels, up to JPEG's loss


@pytest.fixture
def http_folder(tmp_path):
    """``tmp_path/web`` served over HTTP on a free port; yields (folder, base URL)."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    folder = tmp_path / "web"
    folder.mkdir()

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_every_row_of_broken_tables_is_accounted_for_once(tmp_path, http_folder):
    folder, base_url = http_folder
    cases = table_cases(folder, base_url)
    for case in cases:
        recipe = load_recipe(
            {
                "name": "t",
                "storage": {"root": str(tmp_path / case.name)},
                "data": {"train": case.entry},
                "model": {"type": "open-clip", "arch": "RN50"},
            }
        )
        store = Store(recipe.storage.root)
        summary = curate(recipe, clipforge.get_plugin_manager().catalog, store, "out", progress=False)
        rows = pq.read_table(store.path(summary.manifest)).to_pylist()
        assert len(rows) == len(case.expect) == summary.input, (case.name, rows)
        for i, reason in case.expect.items():
            (row,) = [r for r in rows if re.search(rf"{re.escape(case.entry['path'])} row {i}\b", r["detail"])]
            if reason is KEPT:
                assert row["kept"], (case.name, i, row)
            else:
                assert not row["kept"] and row["reason"].startswith(reason), (case.name, i, row)
            assert row["key"] == case.keys.get(i, row["key"]), (case.name, i, row)


def test_bad_recipes_and_arguments_exit_2_naming_the_input(tmp_path, capsys, monkeypatch):
    from clipforge.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # rollback and promote find the store through --workdir
    cases = cli_cases(tmp_path)
    assert len(cases) >= 29
    for case in cases:
        code = main(case.args)
        err = capsys.readouterr().err
        assert code == 2, (case.name, code, err)
        assert "Traceback" not in err and err.count("error:") == 1, (case.name, err)
        for name in case.names:
            assert name in err, (case.name, name, err)


def test_keys_waiting_for_their_members_hold_bounded_memory(tmp_path, monkeypatch):
    """All images first, all captions after: keys wait for their captions until the bytes held reach
    the bound; those given up are dropped, their late captions rows of their own; every key once."""
    from clipforge.plugins.datasets import webdataset

    images = [Entry(f"k{i}.jpg", jpeg(i)) for i in range(10)]
    captions = [Entry(f"k{i}.txt", f"caption {i} of ten".encode()) for i in range(10)]
    monkeypatch.setattr(webdataset, "MAX_PENDING", 3 * max(len(e.data) for e in images))
    path = tmp_path / "sorted-by-kind.tar"
    path.write_bytes(build(images + captions, tarfile.GNU_FORMAT).data)
    samples = list(webdataset.WebDataset(str(path)))
    by_key = collections.Counter(s.key.split("@")[0] for s in samples)
    assert by_key == dict.fromkeys([f"k{i}" for i in range(10)], 1) | {f"k{i}": 2 for i in range(7)}
    whole = [s.key for s in samples if s.caption is not None and s.image is not None]
    assert whole == ["k7", "k8", "k9"]  # the last three waited within the bound and were joined
    late = [s for s in samples if "@" in s.key]
    assert len(late) == 7 and {s.meta["error"] for s in late} == {"key repeated after other keys"}
