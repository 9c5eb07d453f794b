"""A streaming tar reader that survives damage: ustar, GNU and pax headers, checksums checked.

Python's ``tarfile`` stops at the first bad header, silently in stream mode, and ends at the first
end-of-archive marker. This reader reports each damaged stretch and goes on at the next valid
header (found by its ``ustar`` magic and checksum, as GNU tar's ``--ignore-zeros`` recovery and
bsdtar do), and reads archives concatenated into one file whole. It holds one member at a time.
"""

from __future__ import annotations

import struct
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

BLOCK = 512
_ZERO = bytes(BLOCK)
_MAGIC = b"ustar"
_MAGIC_AT = 257
_SCAN_CHUNK = 1 << 16
#: a member bigger than this is skipped (and reported), never held in memory
MAX_MEMBER = 1 << 30
_FILE, _HARDLINK, _SYMLINK, _DIR = (b"0", b"\0", b"7"), b"1", b"2", b"5"
_PAX, _PAX_GLOBAL, _GNU_LONGNAME, _GNU_LONGLINK = b"x", b"g", b"L", b"K"


@dataclass(frozen=True, slots=True)
class TarMember:
    """A member: ``kind`` is ``file`` (with ``data``), ``dir``, ``link`` (``target`` set) or ``other``."""

    name: str
    offset: int  # of its header (of the first extended header before it, when it has one)
    kind: str
    data: bytes | None = None
    target: str = ""


@dataclass(frozen=True, slots=True)
class TarDamage:
    """Bytes that are not a readable member: from ``offset`` to ``resumed`` (None: the end of the file).

    ``name`` is what a damaged header still says its member is called, when that is legible.
    """

    offset: int
    resumed: int | None
    reason: str
    name: str = ""

    def describe(self) -> str:
        """A one-line account of the damage: reason, member, where, and where reading went on."""
        member = f" ({self.name})" if self.name else ""
        resumed = "" if self.resumed is None else f", reading resumed at offset {self.resumed}"
        return f"{self.reason}{member} at offset {self.offset}{resumed}"


class TarError(tarfile.ReadError):
    """A damaged archive, raised by :func:`read_members`."""


class _Stream:
    """A file read forward with the position known and bytes that can be pushed back (for resyncing)."""

    def __init__(self, f: BinaryIO) -> None:
        self._f, self._back, self.pos = f, b"", 0

    def read(self, n: int) -> bytes:
        if self._back:
            data, self._back = self._back[:n], self._back[n:]
            if len(data) < n:
                data += self._fill(n - len(data))
        else:
            data = self._fill(n)
        self.pos += len(data)
        return data

    def _fill(self, n: int) -> bytes:
        data = self._f.read(n)
        while 0 < len(data) < n:  # a raw stream may answer short before its end
            more = self._f.read(n - len(data))
            if not more:
                break
            data += more
        return data

    def unread(self, data: bytes) -> None:
        self._back = data + self._back
        self.pos -= len(data)

    def skip(self, n: int) -> int:
        """Read past ``n`` bytes without holding them; the number actually skipped."""
        done = 0
        while done < n:
            chunk = self.read(min(n - done, 1 << 20))
            if not chunk:
                break
            done += len(chunk)
        return done


def _octal(field: bytes) -> int:
    """A numeric header field: octal text, or GNU's base-256 when the high bit is set."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    return int(text, 8) if text else 0


def _checksum_ok(header: bytes) -> bool:
    try:
        stored = int(header[148:156].split(b"\0", 1)[0].strip(b" ") or b"x", 8)
    except ValueError:
        return False
    unsigned = sum(header) - sum(header[148:156]) + 256
    # some old writers summed signed bytes
    return stored == unsigned or stored == sum(struct.unpack("148b8x356b", header)) + 256


def _text(field: bytes, errors: str = "replace") -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", errors)


def _problem(header: bytes) -> str | None:
    """Why ``header`` is not a valid header, or None."""
    if not _checksum_ok(header):
        return "bad tar header checksum"
    try:
        _octal(header[124:136])
    except ValueError:
        return "bad tar size field"
    return None


def _legible_name(header: bytes) -> str:
    """The name field of a damaged header that is still a header (its magic intact) when it reads as a path, else ""."""
    if header[_MAGIC_AT : _MAGIC_AT + len(_MAGIC)] != _MAGIC:
        return ""  # not a header that was damaged, but bytes that never were one
    try:
        name = _header_name(header, errors="strict")
    except UnicodeDecodeError:
        return ""
    return name if name and name.isprintable() and not name.startswith("/") else ""


def _pax(data: bytes) -> dict[str, str]:
    """The records ``"%d %s=%s\\n"`` of a pax extended header."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            break
        if length <= 0:
            break
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return out


def _resync(s: _Stream) -> int | None:
    """Move ``s`` to the next valid header (found by its magic, then checked); its offset, or None at the end."""
    window, base, searched = b"", s.pos, 0  # base: the offset of window[0]; no header starts in window[:searched - 257]
    while True:
        chunk = s.read(_SCAN_CHUNK)
        window += chunk
        while True:
            i = window.find(_MAGIC, max(searched, _MAGIC_AT))
            if i < 0:
                searched = max(searched, len(window) - len(_MAGIC) + 1)
                break
            start = i - _MAGIC_AT
            if start + BLOCK > len(window) and chunk:
                searched = i
                break  # the candidate's block is not all read yet
            if start + BLOCK <= len(window) and _problem(window[start : start + BLOCK]) is None:
                s.unread(window[start:])
                return base + start
            searched = i + 1
        if not chunk:
            return None
        keep = max(searched - _MAGIC_AT, 0)  # what a magic not yet found could still belong to
        window, base, searched = window[keep:], base + keep, searched - keep


def read_members(f: BinaryIO) -> Iterator[TarMember]:
    """The members of an archive that must be whole (one clipforge wrote): damage raises :class:`TarError`."""
    for item in read_tar(f):
        if isinstance(item, TarDamage):
            raise TarError(item.describe())
        yield item


def read_tar(f: BinaryIO, *, max_member: int = MAX_MEMBER) -> Iterator[TarMember | TarDamage]:
    """The members of the tar archive(s) in ``f``, in order, and a :class:`TarDamage` for each stretch
    that is not one (reading goes on at the next valid header)."""
    s = _Stream(f)
    pax: dict[str, str] = {}
    long_name = long_link = None
    first: int | None = None  # offset of the extended headers before the member, if any
    while True:
        offset = s.pos
        header = s.read(BLOCK)
        if not header:
            return
        damage: TarDamage | None = None
        if len(header) < BLOCK:
            if not header.strip(b"\0"):
                return  # short zero padding at the end
            damage = TarDamage(offset, None, "truncated archive")
        elif header == _ZERO:
            continue  # an end-of-archive marker or padding: another archive may follow
        elif (problem := _problem(header)) is not None:
            name = _legible_name(header)
            s.unread(header[1:])
            damage = TarDamage(offset, _resync(s), problem, name)
        if damage is not None:
            yield damage
            pax, long_name, long_link, first = {}, None, None, None
            if damage.resumed is None:
                return
            continue
        kind = header[156:157]
        size = int(pax["size"]) if "size" in pax and pax["size"].isdigit() else _octal(header[124:136])
        if kind in (_HARDLINK, _SYMLINK, _DIR):
            size = 0  # these carry no data, whatever the size field says
        name = long_name or pax.get("path") or _header_name(header)
        if size > max_member:
            skipped = s.skip(size + (-size % BLOCK))
            resumed = s.pos if skipped >= size else None
            yield TarDamage(
                offset if first is None else first, resumed, f"member of {size} bytes, over the {max_member}-byte limit", name
            )
            pax, long_name, long_link, first = {}, None, None, None
            if resumed is None:
                return
            continue
        data = s.read(size)
        if len(data) < size:
            yield TarDamage(offset if first is None else first, None, "truncated archive", name)
            return
        s.skip(-size % BLOCK)
        if kind in (_PAX, _GNU_LONGNAME, _GNU_LONGLINK):
            first = offset if first is None else first
            if kind == _PAX:
                pax = _pax(data)
            elif kind == _GNU_LONGNAME:
                long_name = _text(data)
            else:
                long_link = _text(data)
            continue
        start = offset if first is None else first
        if kind == _PAX_GLOBAL:
            pass  # defaults for the members that follow: nothing clipforge reads
        elif kind in _FILE:
            yield TarMember(name, start, "file", data)
        elif kind == _DIR:
            yield TarMember(name.rstrip("/"), start, "dir")
        elif kind in (_HARDLINK, _SYMLINK):
            yield TarMember(name, start, "link", target=long_link or pax.get("linkpath") or _text(header[157:257]))
        else:
            yield TarMember(name, start, "other")
        pax, long_name, long_link, first = {}, None, None, None


def _header_name(header: bytes, errors: str = "replace") -> str:
    name = _text(header[0:100], errors)
    if header[257:263] == b"ustar\x00":  # POSIX ustar: a prefix field extends the name (GNU's has none)
        prefix = _text(header[345:500], errors)
        if prefix:
            return f"{prefix}/{name}"
    return name
