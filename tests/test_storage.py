"""The store: atomic writes, retries on transient errors, paths that stay under the root."""

from __future__ import annotations

import os

import pytest

from clipforge.core.retry import retry
from clipforge.core.storage import Store


def test_write_read_json_and_listing(tmp_path):
    store = Store(str(tmp_path / "root"))
    uri = store.write_json("a/b.json", {"x": 1})
    assert uri == str(tmp_path / "root" / "a" / "b.json")
    assert store.read_json("a/b.json") == {"x": 1}
    assert store.exists("a/b.json") and not store.exists("a/c.json")
    assert store.ls("a") == ["b.json"] and store.ls("missing") == []


def test_a_failed_write_leaves_nothing_under_the_final_name(tmp_path, monkeypatch):
    store = Store(str(tmp_path))
    store.write_bytes("f.bin", b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        store.write_bytes("f.bin", b"new")
    assert (tmp_path / "f.bin").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]  # no temporary file left


def test_a_stream_shows_under_its_name_only_once_complete(tmp_path):
    store = Store(str(tmp_path))
    with store.open_atomic("d/f.bin") as f:
        f.write(b"one")
        assert store.ls("d") != ["f.bin"]
        f.write(b"two")
    assert store.read_bytes("d/f.bin") == b"onetwo"
    with pytest.raises(RuntimeError, match="producer failed"), store.open_atomic("d/g.bin") as f:
        f.write(b"half")
        raise RuntimeError("producer failed")
    assert store.ls("d") == ["f.bin"]  # no g.bin, no temporary file


def test_a_shard_writer_publishes_a_whole_tar_or_nothing(tmp_path):
    import hashlib

    from clipforge.core.components import Sample
    from clipforge.engine.shards import ShardWriter, decode, iter_shard

    store = Store(str(tmp_path))
    items = [decode(Sample(f"k{i}", bytes(_png(i)), f"caption {i}")) for i in range(40)]
    with ShardWriter(store, "s.tar") as writer:
        writer.FLUSH_BYTES = 2048  # several background writes
        for item in items:
            writer.add(item)
        written = writer.close()
    assert written["samples"] == 40 and written["sha256"] == hashlib.sha256(store.read_bytes("s.tar")).hexdigest()
    assert [(r["key"], r["image"], r["caption"]) for r in iter_shard(store, "s.tar")] == [
        (i.sample.key, i.image_bytes, i.sample.caption) for i in items
    ]
    with pytest.raises(ValueError, match="bad sample"), ShardWriter(store, "t.tar") as writer:
        writer.add(items[0])
        raise ValueError("bad sample")
    assert store.ls() == ["s.tar"]


def test_the_shard_reader_reads_tarfile_archives_and_refuses_damaged_ones(tmp_path):
    import io
    import tarfile

    from clipforge.engine.shards import iter_shard

    buf = io.BytesIO()
    long_key = "d" * 60 + "/" + "k" * 60  # past the 100-byte name field: ustar's prefix field holds the folder
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in (
            (f"{long_key}.png", _png(1)),
            (f"{long_key}.txt", b"a long key"),
            ("k2.png", _png(2)),
            ("k2.txt", b"second"),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    store = Store(str(tmp_path))
    store.write_bytes("ok.tar", buf.getvalue())
    assert [(r["key"], r["caption"]) for r in iter_shard(store, "ok.tar")] == [(long_key, "a long key"), ("k2", "second")]
    store.write_bytes("cut.tar", buf.getvalue()[:1300])
    with pytest.raises(tarfile.ReadError, match="cut.tar: truncated archive"):
        list(iter_shard(store, "cut.tar"))
    damaged = bytearray(buf.getvalue())
    damaged[5] ^= 0xFF
    store.write_bytes("bad.tar", bytes(damaged))
    with pytest.raises(tarfile.ReadError, match="bad.tar: bad tar header checksum"):
        list(iter_shard(store, "bad.tar"))


def _png(seed: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (seed, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def test_paths_cannot_leave_the_root(tmp_path):
    store = Store(str(tmp_path))
    for bad in ("../x", "a/../../x", "/etc/passwd"):
        with pytest.raises(ValueError, match="stay under the root"):
            store.path(bad)


def test_put_dir_and_get_dir_round_trip(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("a")
    (src / "sub" / "b.txt").write_text("b")
    store = Store(str(tmp_path / "root"))
    store.put_dir(src, "dir")
    out = store.get_dir("dir", tmp_path / "out")
    assert (out / "a.txt").read_text() == "a" and (out / "sub" / "b.txt").read_text() == "b"


def test_retry_retries_transient_errors_only(monkeypatch):
    monkeypatch.setattr("time.sleep", lambda s: None)
    calls = []

    @retry
    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("503 Service Unavailable")
        return "ok"

    assert flaky() == "ok" and len(calls) == 3

    @retry
    def missing():
        calls.append(1)
        raise FileNotFoundError("gone")

    calls.clear()
    with pytest.raises(FileNotFoundError):
        missing()
    assert len(calls) == 1


def test_writes_to_the_store_refuse_open_for_writing(tmp_path):
    with pytest.raises(ValueError, match="atomic"):
        Store(str(tmp_path)).open("x", "wb")
