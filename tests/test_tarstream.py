"""The damage-tolerant tar reader against archives Python's tarfile writes, whole and damaged."""

from __future__ import annotations

import io
import tarfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clipforge.core.tarstream import TarDamage, TarError, TarMember, read_members, read_tar

FORMATS = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}


def archive(members: list[tuple[str, bytes]], fmt: int = tarfile.GNU_FORMAT) -> tuple[bytes, list[tuple[int, int]]]:
    """A tar of regular files and, for each member, the byte range from its first header to the end of its data."""
    buf = io.BytesIO()
    spans = []
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            start = buf.tell()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            spans.append((start, buf.tell()))
    return buf.getvalue(), spans


def read(data: bytes, **kw) -> list[TarMember | TarDamage]:
    return list(read_tar(io.BytesIO(data), **kw))


def files(items: list[TarMember | TarDamage]) -> list[tuple[str, bytes | None]]:
    return [(m.name, m.data) for m in items if isinstance(m, TarMember)]


def test_reads_every_format_with_long_names_links_and_folders():
    long = "d/" + "p" * 120 + "/" + "x" * 60 + ".jpg"  # ustar: in the prefix field; GNU: a long-name header; pax: a record
    for fmt in FORMATS.values():
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            folder = tarfile.TarInfo("d")
            folder.type = tarfile.DIRTYPE
            tar.addfile(folder)
            for name, data in (("d/a.txt", b"alpha"), (long, b"\x00" * 700), ("d/caf\u00e9.txt", b"")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            link = tarfile.TarInfo("d/b.jpg")
            link.type, link.linkname = tarfile.SYMTYPE, "a.txt"
            tar.addfile(link)
        items = read(buf.getvalue())
        assert not [i for i in items if isinstance(i, TarDamage)]
        names = [(i.name, i.kind) for i in items]
        assert names == [("d", "dir"), ("d/a.txt", "file"), (long, "file"), ("d/caf\u00e9.txt", "file"), ("d/b.jpg", "link")]
        assert items[2].data == b"\x00" * 700 and items[4].target == "a.txt"


def test_concatenated_archives_are_read_whole():
    first, _ = archive([("a.txt", b"1"), ("b.txt", b"2")])
    second, _ = archive([("c.txt", b"3")], tarfile.PAX_FORMAT)
    expected = [("a.txt", b"1"), ("b.txt", b"2"), ("c.txt", b"3"), ("a.txt", b"1"), ("b.txt", b"2")]
    assert files(read(first + second + first)) == expected


def test_a_corrupt_header_is_reported_and_reading_resumes_after_it():
    data, spans = archive([(f"k{i}.txt", str(i).encode() * 600) for i in range(5)])
    damaged = bytearray(data)
    damaged[spans[2][0] + 130] ^= 0x55  # the size field of the third member's header
    items = read(bytes(damaged))
    (damage,) = [i for i in items if isinstance(i, TarDamage)]
    assert (damage.offset, damage.resumed, damage.reason, damage.name) == (
        spans[2][0],
        spans[3][0],
        "bad tar header checksum",
        "k2.txt",
    )
    assert [n for n, _ in files(items)] == ["k0.txt", "k1.txt", "k3.txt", "k4.txt"]
    with pytest.raises(TarError, match=f"bad tar header checksum \\(k2.txt\\) at offset {spans[2][0]}"):
        list(read_members(io.BytesIO(bytes(damaged))))


def test_truncation_and_oversized_members():
    data, spans = archive([("a.txt", b"a" * 2000), ("b.txt", b"b" * 2000)])
    items = read(data[: spans[1][0] + 700])
    assert files(items) == [("a.txt", b"a" * 2000)]
    assert items[-1] == TarDamage(spans[1][0], None, "truncated archive", "b.txt")
    items = read(data, max_member=1000)
    assert [(i.reason, i.name, i.resumed) for i in items if isinstance(i, TarDamage)] == [
        ("member of 2000 bytes, over the 1000-byte limit", "a.txt", spans[1][0]),
        ("member of 2000 bytes, over the 1000-byte limit", "b.txt", spans[1][1]),
    ]
    assert read(data[:700]) == [TarDamage(0, None, "truncated archive", "a.txt")]
    assert read(data[:300]) == [TarDamage(0, None, "truncated archive")]
    assert read(b"") == [] and read(bytes(1024 + 100)) == []


@settings(max_examples=150, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=12),
    fmt=st.sampled_from(sorted(FORMATS)),
    cut=st.tuples(st.floats(0, 1), st.integers(1, 1500)),
    copies=st.integers(1, 2),
)
def test_every_member_the_damage_did_not_touch_is_read(sizes, fmt, cut, copies):
    """Bytes flipped anywhere (headers, data, padding, the end marker): every member whose header and
    data lie outside them is read as written; each damage is reported where it starts."""
    members = [(f"dir/{i:03d}.{'jpg' if i % 2 else 'txt'}", bytes([48 + i % 10]) * n) for i, n in enumerate(sizes)]
    one, spans = archive(members, FORMATS[fmt])
    data = one * copies  # archives concatenated
    spans = [(a + c * len(one), b + c * len(one)) for c in range(copies) for a, b in spans]
    members = members * copies
    start = int(cut[0] * (len(data) - 1))
    end = min(len(data), start + cut[1])
    damaged = bytearray(data)
    for i in range(start, end):
        damaged[i] ^= 0xFF
    items = read(bytes(damaged))
    got = files(items)
    untouched = [m for m, (a, b) in zip(members, spans) if b <= start or a >= end]
    position = 0
    for member in untouched:  # in order, each once
        position = got.index(member, position) + 1
    for damage in (i for i in items if isinstance(i, TarDamage)):
        assert damage.offset < end and (damage.resumed is None or damage.resumed > damage.offset)
