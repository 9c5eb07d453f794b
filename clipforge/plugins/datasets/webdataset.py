"""``webdataset``: tar shards in img2dataset's layout (``KEY.jpg|png|webp``, ``KEY.txt``, ``KEY.json``), local or on S3.

Shards from real crawls are read for everything they still hold (see docs/curation.md, "Bad input"):

- a damaged stretch (a corrupt header, a truncation) costs only the members in it: reading goes
  on at the next valid header (:func:`clipforge.read_tar`), and archives concatenated into
  one file are read whole;
- every key read yields exactly one sample; one the shard cannot give whole carries an ``error``
  (the reason curation records) and its ``source`` (the shard and byte offset) in ``meta``;
- a key's members that are not adjacent are joined while the key is incomplete; the first member
  of each kind wins and a later repeat is named in the sample's ``source``; members of a key that
  come back after it was complete are one more sample, ``KEY@OFFSET``, dropped with its reason, and
  so is a second image of a key whose sample is already whole (the same key written twice in a row);
- a key with characters a curated key cannot hold (spaces, ``:``, ``?``, ``#``, ``\\``, non-ASCII)
  is made safe as ``SAFE-HASH`` (a hash of the key as read), so keys that differ in those characters
  alone stay apart, in any shard and any part; the key as read is in the ``source``;
- damage that no key read explains is a sample of its own, named by the member its header still
  names, else ``SHARD@OFFSET``; a shard with no member at all (zero bytes, or an empty archive) is
  a row ``SHARD@0`` of its own.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

import clipforge
from clipforge import Sample, TarDamage, TarMember, open_input, read_tar

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
#: a member bigger than this is no image or caption of a crawl: skipped and reported
MAX_MEMBER = 256 << 20
#: incomplete keys wait this many bytes for their other members before they are given up as incomplete
MAX_PENDING = 64 << 20
# fields of ``meta`` the reader sets; a sidecar's fields of the same name are kept as ``json_<name>``
_RESERVED = ("shard", "source", "error", "json", "json_error")

# Reasons (stable categories; the manifest's detail names the shard and offset)
TRUNCATED = "truncated or unreadable shard"
CORRUPT_HEADER = "corrupt tar header"
TOO_LARGE = "member too large"
LINKS = "members are links"
LINKED_IMAGE = "image is a link"
LINKED_CAPTION = "caption is a link"
NO_IMAGE = "no image"
REPEATED_KEY = "key repeated after other keys"
DUPLICATE_KEY = "duplicate key in shard"
EMPTY_SHARD = "empty shard"

# what a curated key may hold (the curated shards' member names): letters, digits, ``_``, ``-``, folders
_SAFE_KEY = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")
MAX_KEY = 200  # what curation accepts


class WebDatasetParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options (endpoint_url, ...)")
    urls: str | list[str] = Field(
        description="shard paths or URLs: a list, a glob (shards/*.tar) or a brace pattern (shard-{000000..000099}.tar)"
    )

    @field_validator("urls")
    @classmethod
    def _globs_match(cls, urls: str | list[str], info: ValidationInfo) -> str | list[str]:
        for item, matched in _expansions(urls, info.data.get("storage_options") or {}):
            if not matched:
                raise ValueError(f"no shard matches {item!r}")
        return urls

    def check_inputs(self) -> list[tuple[str, str]]:
        """The shards named exist (globs were matched by validation). Of a long list, 64 spread over it
        are looked up: a crawl of thousands of shards on S3 is not stat'ed one by one before a run."""
        import fsspec

        urls = expand_urls(self.urls, self.storage_options)
        step = max(1, len(urls) // 64)
        sample = sorted(set(urls[::step]) | {urls[-1]}) if urls else []
        missing = []
        for url in sample:
            try:
                fs, path = fsspec.core.url_to_fs(url, **self.storage_options)
                if not fs.exists(path):
                    missing.append(url)
            except (OSError, ValueError) as e:
                return [("urls", f"webdataset: cannot look up {url!r}: {e}")]
        if not missing:
            return []
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        return [("urls", f"webdataset: no such shard: {', '.join(map(repr, missing[:3]))}{more}")]


def _expansions(urls: str | list[str], storage_options: dict[str, Any]) -> Iterator[tuple[str, list[str]]]:
    """Each item of ``urls`` after brace expansion, with the shards it names (a glob: those that exist)."""
    import braceexpand
    import fsspec

    for url in [urls] if isinstance(urls, str) else urls:
        for item in braceexpand.braceexpand(url):
            if any(c in item for c in "*?["):
                fs, _, paths = fsspec.get_fs_token_paths(item, storage_options=storage_options)
                yield item, sorted(fs.unstrip_protocol(p) if "://" in item else p for p in paths)
            else:
                yield item, [item]


def expand_urls(urls: str | list[str], storage_options: dict[str, Any]) -> list[str]:
    """Every shard the entry names, brace patterns and globs expanded, in order."""
    return [url for _, matched in _expansions(urls, storage_options) for url in matched]


class WebDataset:
    """Samples of webdataset tar shards, every key read accounted for (see the module's docstring)."""

    def __init__(self, urls: str | list[str], storage_options: dict[str, Any] | None = None):
        self.storage_options = dict(storage_options or {})
        self.urls = []
        for item, matched in _expansions(urls, self.storage_options):
            if not matched:
                raise clipforge.ConfigError(f"webdataset: no shard matches {item!r}")
            self.urls += matched
        if not self.urls:
            raise clipforge.ConfigError(f"webdataset: no shard matches {urls!r}")

    def __iter__(self) -> Iterator[Sample]:
        for url in self.urls:
            yield from _Shard(url, self.storage_options).samples()

    def parts(self) -> list[dict[str, Any]]:
        """One dataset entry per shard, for curation to process in parallel."""
        return [{"type": "webdataset", "urls": url, "storage_options": self.storage_options} for url in self.urls]


def _split(name: str) -> tuple[str, str]:
    """The key of member ``name``, made safe (:func:`safe_key`), and its extension."""
    raw, ext = _raw_split(name)
    return safe_key(raw), ext


def _raw_split(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is everything before the first dot of the file name (``./`` aside)."""
    while name.startswith("./"):
        name = name[2:]
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(folder, stem) if folder else stem), ext.lower()


def safe_key(raw: str) -> str:
    """``raw`` if a curated key can hold it, else its unsafe characters as ``_`` and a hash of ``raw``.

    The hash depends on the key alone, not on what else a shard holds, so the same key read in two
    shards (two parts) stays one key (curation drops the later as a duplicate) and distinct keys stay
    distinct. Keys that could climb out of a folder, or are too long, stay as read: curation drops
    them as ``invalid key``.
    """
    if _SAFE_KEY.match(raw) or len(raw) > MAX_KEY or raw.startswith("/") or ".." in raw.split("/"):
        return raw
    digest = hashlib.sha1(raw.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{_UNSAFE.sub('_', raw)[: MAX_KEY - 13]}-{digest}"


def _slot(ext: str) -> str | None:
    """The member kind an extension fills: ``image``, ``txt``, ``json``, or None (not read)."""
    return "image" if ext in IMAGE_EXTS else ext if ext in ("txt", "json") else None


class _Counted:
    """A file read forward, the bytes read counted (to tell an empty shard from an empty archive)."""

    def __init__(self, f: Any) -> None:
        self.f, self.bytes = f, 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.bytes += len(data)
        return data


@dataclass(eq=False)
class _Damage:
    """A damage seen in a shard, and whether a key's sample accounts for it."""

    damage: TarDamage
    key: str  # of the member its header still names, or ""
    told: bool = False


@dataclass(eq=False)
class _Group:
    """The members of one key read so far."""

    key: str
    offset: int
    image: TarMember | None = None
    txt: TarMember | None = None
    json: TarMember | None = None
    links: list[TarMember] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    nearby: list[_Damage] = field(default_factory=list)  # damages next to one of its members
    repeat_of: int | None = None  # for members that came back after their key's sample: that sample's offset
    adjacent: bool = False  # a repeat that follows its key's whole sample at once (the key written twice)
    raw: str = ""  # the key as read, when it had to be made safe
    size: int = 0

    @property
    def complete(self) -> bool:
        return self.image is not None and self.txt is not None

    def holds(self, member: TarMember, ext: str) -> bool:
        """Whether the group already has a member of ``member``'s kind."""
        slot = _slot(ext)
        return member.kind == "file" and slot is not None and getattr(self, slot) is not None

    def add(self, member: TarMember, ext: str) -> None:
        slot = _slot(ext)
        if member.kind != "file":
            self.links.append(member)
            return
        if slot is None:
            return  # members of other kinds (.cls, .npy, ...) are not read
        first = getattr(self, slot)
        if first is not None:
            self.notes.append(f"{member.name} at @{member.offset} repeats {first.name} at @{first.offset}: the first is used")
            return
        setattr(self, slot, member)
        self.size += len(member.data or b"")


class _Shard:
    """One shard read into samples: members grouped by key, damage accounted for."""

    def __init__(self, url: str, storage_options: dict[str, Any]) -> None:
        self.url, self.storage_options = url, storage_options
        self.current: _Group | None = None
        self.pending: dict[str, _Group] = {}  # incomplete keys waiting for members that may come later
        self.pending_bytes = 0
        self.done: dict[str, int] = {}  # keys yielded, and the offset of their sample
        self.damages: list[_Damage] = []
        self.after: list[_Damage] = []  # damages that the next member read is next to
        self.offset = 0  # of the last member read

    def samples(self) -> Iterator[Sample]:
        counted: _Counted | None = None
        read = 0
        try:
            with open_input(self.url, self.storage_options) as f:
                counted = _Counted(f)
                for item in read_tar(cast(BinaryIO, counted), max_member=MAX_MEMBER):
                    read += 1
                    if isinstance(item, TarDamage):
                        self._damage(item)
                    elif item.kind != "dir":
                        yield from self._member(item)
        except OSError as e:  # the shard cannot be opened, or a read failed after its retries
            self._damage(TarDamage(self.offset, None, f"unreadable ({type(e).__name__}: {e})"[:300]))
        if counted is not None and not read and not self.damages:  # not one member: the shard is empty
            what = "0 bytes" if not counted.bytes else f"a tar archive of {counted.bytes} bytes with no members"
            yield self._bad(f"{posixpath.basename(self.url)}@0", EMPTY_SHARD, f"{self.url}: {what}")
            return
        yield from self._close(self.current)
        self.current = None
        for group in list(self.pending.values()):
            yield from self._give_up(group)
        for d in self.damages:  # damage no key's sample accounts for: a sample of its own
            if not d.told:
                key = d.key if d.key and d.key not in self.done else f"{posixpath.basename(self.url)}@{d.damage.offset}"
                self.done[key] = d.damage.offset
                yield self._bad(key, _reason(d.damage), f"{self.url}: {d.damage.describe()}")

    def _damage(self, damage: TarDamage) -> None:
        record = _Damage(damage, _split(damage.name)[0] if damage.name else "")
        self.damages.append(record)
        if self.current is not None:
            self.current.nearby.append(record)
        self.after.append(record)

    def _member(self, member: TarMember) -> Iterator[Sample]:
        self.offset = member.offset
        key, ext = _split(member.name)
        group = self.current
        if group is not None and group.key == key and group.complete and ext in IMAGE_EXTS and member.kind == "file":
            # a second image of a whole sample: the key's members start again, one more sample of that key
            yield from self._close(group)
            group = _Group(key, member.offset, repeat_of=self.done.get(key, group.offset), adjacent=True)
            self.current = group
        elif group is None or group.key != key:
            yield from self._close(group)
            if key in self.pending and self.pending[key].holds(member, ext):
                # the incomplete key already has a member of this kind: these are the key's members again
                yield from self._give_up(self.pending[key])
            group = self._open(key, member.offset)
            self.current = group
        if key != (raw := _raw_split(member.name)[0]):
            group.raw = raw
        if self.after:
            group.nearby += [d for d in self.after if d not in group.nearby]
            self.after = []
        group.add(member, ext)

    def _open(self, key: str, offset: int) -> _Group:
        """The group a member of ``key`` at ``offset`` joins: an incomplete one of that key, or a new one."""
        if key in self.pending:
            group = self.pending.pop(key)
            self.pending_bytes -= group.size
            group.notes.append(f"members also at @{offset}, after other keys")
            return group
        return _Group(key, offset, repeat_of=self.done.get(key))

    def _close(self, group: _Group | None) -> Iterator[Sample]:
        """The sample of ``group`` once its key's members stop; an incomplete one waits for the rest."""
        if group is None:
            return
        if group.complete or group.repeat_of is not None:
            yield self._sample(group)
            return
        self.pending[group.key] = group
        self.pending_bytes += group.size
        while self.pending_bytes > MAX_PENDING and self.pending:
            yield from self._give_up(next(iter(self.pending.values())))

    def _give_up(self, group: _Group) -> Iterator[Sample]:
        del self.pending[group.key]
        self.pending_bytes -= group.size
        yield self._sample(group)

    def _sample(self, group: _Group) -> Sample:
        """The one sample of ``group``'s key, with the reason it is bad, if it is."""
        source = f"{self.url}@{group.offset}" + (f" (key {group.raw!r})" if group.raw else "")
        # a damage next to the group is its own when the damaged header names its key, or when it
        # explains a member the group lacks
        whole = group.complete or group.repeat_of is not None
        told = [d for d in group.nearby if d.key == group.key or not whole]
        for d in told:
            d.told = True
        notes = [*group.notes, *(d.damage.describe() for d in told if whole)]
        if group.repeat_of is not None:
            where = "again right after its sample" if group.adjacent else "after other keys"
            notes.insert(0, f"members of {group.key} {where}; its sample is the one at @{group.repeat_of}")
            reason = DUPLICATE_KEY if group.adjacent else REPEATED_KEY
            return self._bad(f"{group.key}@{group.offset}", reason, "; ".join([source, *notes]))
        self.done[group.key] = group.offset
        error = None
        if not group.complete:
            if told:
                error = _reason(told[0].damage)
                notes.append(told[0].damage.describe())
            elif group.links and group.image is None and group.txt is None and group.json is None:
                error = LINKS
            elif group.image is None:
                error = LINKED_IMAGE if any(_split(m.name)[1] in IMAGE_EXTS for m in group.links) else NO_IMAGE
            elif any(_split(m.name)[1] == "txt" for m in group.links):
                error = LINKED_CAPTION
        meta = _sidecar(group.json.data if group.json is not None else None)
        meta.update(shard=self.url, source="; ".join([source, *notes]))
        if error:
            meta["error"] = error
        image = group.image.data if group.image is not None else None
        # captions stay bytes here: curation decodes them and drops non-UTF-8 with its reason
        caption = group.txt.data if group.txt is not None else None
        return Sample(key=group.key, image=image, caption=caption, meta=meta)

    def _bad(self, key: str, reason: str, detail: str) -> Sample:
        return Sample(key=key, image=None, caption=None, meta={"shard": self.url, "error": reason, "source": detail})


def _reason(damage: TarDamage) -> str:
    if damage.reason.startswith("member of"):
        return TOO_LARGE
    if damage.reason.startswith("bad tar"):
        return CORRUPT_HEADER
    return TRUNCATED


def _sidecar(data: bytes | None) -> dict[str, Any]:
    """The sample's ``KEY.json`` as meta fields; one that is not a JSON object is kept whole under ``json``."""
    if data is None:
        return {}
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return {"json_error": "invalid JSON"}
    if not isinstance(value, dict):
        return {"json": value, "json_error": f"not a JSON object ({type(value).__name__})"}
    return {f"json_{k}" if k in _RESERVED else k: v for k, v in value.items()}


@clipforge.hookimpl
def register_datasets(register):
    register("webdataset", WebDataset, params=WebDatasetParams)
