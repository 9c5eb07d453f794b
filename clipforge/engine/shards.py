"""Curated shards: webdataset-layout tar files (``KEY.png|jpg|webp``, ``KEY.txt``, ``KEY.json``) on the store."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import tarfile
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from clipforge.core.components import Sample
from clipforge.core.results import Shard
from clipforge.core.storage import Store
from clipforge.core.tarstream import TarError, read_members

# A key becomes a tar member name: no path traversal, no dots (webdataset splits the extension at the first dot).
_KEY = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*$")
_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
_ORIENTATION = 0x0112  # EXIF: how the stored pixels must turn to stand upright
MAX_CAPTION_CHARS = 10_000


class BadSample(ValueError):
    """A sample that cannot be used; the message is the reason recorded in the manifest."""


@dataclass
class Decoded:
    """A sample checked and decoded: the PIL image for the curation steps, the bytes for the shard.

    ``loaded`` is False while the image is only opened (format and size read, pixels not yet
    decoded): see :func:`decode` with ``pixels=False`` and :func:`load_pixels`.
    """

    sample: Sample
    image_bytes: bytes
    ext: str
    loaded: bool = True


def decode(sample: Sample, *, pixels: bool = True) -> Decoded:
    """Check a raw sample and decode its image, or raise :class:`BadSample` with the reason.

    With ``pixels=False`` a JPEG, PNG or WebP is only opened: its size, mode and format are
    known (and a decompression bomb is caught), its pixels are decoded by :func:`load_pixels`.
    """
    if sample.meta.get("error"):  # the dataset could not read this sample and says why
        raise BadSample(str(sample.meta["error"]))
    key = sample.key
    if not isinstance(key, str) or not _KEY.match(key) or len(key) > 200:
        raise BadSample("invalid key")
    captions: list[Any] = sample.caption if isinstance(sample.caption, list) else [sample.caption]
    if not captions or any(c is None for c in captions):
        raise BadSample("missing caption")
    if any(isinstance(c, bytes) for c in captions):
        try:
            captions = [c.decode("utf-8") if isinstance(c, bytes) else c for c in captions]
        except UnicodeDecodeError:
            raise BadSample("caption is not UTF-8") from None
    if not all(isinstance(c, str) for c in captions):
        raise BadSample("caption is not text")
    if not all(map(visible, captions)):
        raise BadSample("empty caption")
    if any(len(c) > MAX_CAPTION_CHARS for c in captions):
        raise BadSample(f"caption longer than {MAX_CAPTION_CHARS} characters")
    image = sample.image
    with _image_errors():
        if isinstance(image, (bytes, bytearray)):
            if not image:
                raise BadSample("empty image file")
            pil: Image.Image = Image.open(io.BytesIO(image))
            ext = _FORMATS.get(pil.format or "")
            if ext and _orientation(pil) in (1, None):
                data, loaded = bytes(image), False
            elif ext:  # turned upright now, so that no reader of the curated bytes needs to know EXIF
                pil = _rgb(ImageOps.exif_transpose(pil))
                data, loaded = encode(pil, ext), True
            else:  # stored as PNG, which needs the pixels now
                pil = _rgb(pil)
                data, ext, loaded = _png(pil), "png", True
        elif isinstance(image, Image.Image):
            if _orientation(image) not in (1, None):
                image = ImageOps.exif_transpose(image)
            pil, data, ext, loaded = _rgb(image), _png(image), "png", True
        else:
            raise BadSample("no image")
    caption = captions if isinstance(sample.caption, list) else captions[0]
    clean = Sample(key=key, image=pil, caption=caption, label=sample.label, meta=dict(sample.meta))
    item = Decoded(clean, data, ext, loaded)
    return load_pixels(item) if pixels else item  # decodes fully: truncated files fail here, not later in training


# characters that print nothing although Unicode files them as letters or symbols: Hangul fillers, the blank Braille pattern
_BLANK = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def visible(text: str) -> bool:
    """Whether ``text`` shows anything: a letter, digit, punctuation or symbol, not only spaces,
    control or format characters (zero-width spaces, joiners, byte-order marks) or combining marks."""
    return any(unicodedata.category(ch)[0] in "LNPS" and ch not in _BLANK for ch in text)


def load_pixels(item: Decoded) -> Decoded:
    """Decode the pixels of an image :func:`decode` only opened, or raise :class:`BadSample`."""
    if not item.loaded:
        with _image_errors():
            item.sample.image = _rgb(item.sample.image)
        item.loaded = True
    return item


def _orientation(image: Image.Image) -> int | None:
    """The EXIF orientation tag, read without decoding pixels (PNG's only when it precedes the pixels)."""
    if image.format != "PNG":
        return image.getexif().get(_ORIENTATION)
    exif = Image.Exif()
    if image.info.get("exif"):  # PNG's getexif() would decode the pixels to look after them
        exif.load(image.info["exif"])
    return exif.get(_ORIENTATION)


def encode(image: Image.Image, ext: str) -> bytes:
    """``image`` in the format of ``ext`` (jpg, webp: quality 95; png)."""
    buf = io.BytesIO()
    fmt = {"jpg": "JPEG", "webp": "WEBP"}.get(ext, "PNG")
    image.save(buf, format=fmt, **({"quality": 95} if fmt != "PNG" else {}))
    return buf.getvalue()


def _rgb(image: Image.Image) -> Image.Image:
    image.load()
    return image if image.mode == "RGB" else image.convert("RGB")  # convert copies even when there is nothing to do


@contextlib.contextmanager
def _image_errors() -> Iterator[None]:
    """PIL's many exception types for bad image data, as one :class:`BadSample` with a reason."""
    try:
        yield
    except BadSample:
        raise
    except Image.DecompressionBombError:
        raise BadSample("decompression bomb") from None
    except Exception as e:  # PIL raises a zoo of types for corrupt data
        raise BadSample(f"undecodable image ({type(e).__name__})") from None


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def _header_template() -> tuple[bytes, int]:
    """A ustar header with every field but name, size and checksum filled, and the byte sum of those fields."""
    header = bytearray(512)
    header[100:108] = b"0000644\0"
    header[108:116] = header[116:124] = b"0000000\0"
    header[136:148] = b"00000000000\0"
    header[148:156] = b" " * 8  # the checksum is computed with its own field as spaces
    header[156:157] = b"0"
    header[257:265] = b"ustar\x0000"
    return bytes(header), sum(header)


_HEADER, _HEADER_SUM = _header_template()


def _member(name: str, data: bytes) -> bytes:
    """One ustar member, header and padded data: tarfile's own writer costs more than decoding a small image."""
    if len(name) > 100 or not name.isascii():  # long names need the prefix field: leave those to tarfile
        info = tarfile.TarInfo(name)
        info.size = len(data)
        header = info.tobuf(format=tarfile.USTAR_FORMAT)
    else:
        encoded, size = name.encode(), b"%011o\0" % len(data)
        checksum = b"%06o\0" % (_HEADER_SUM + sum(encoded) + sum(size))
        header = b"".join((encoded, _HEADER[len(encoded) : 124], size, _HEADER[136:148], checksum, _HEADER[155:]))
    return header + data + b"\0" * (-len(data) % 512)


def index_of(rel: str) -> str:
    """Where a shard's index lies: the byte offset of each sample, then of the archive's end (``.npy``)."""
    return f"{rel}.idx.npy"


class ShardWriter:
    """A tar shard streamed to the store while samples are still being decoded.

    Samples become tar bytes at once (no decoded image is held); a background thread writes and
    hashes them, so storage I/O overlaps decoding. The shard appears under its name only when
    :meth:`close` returns; :meth:`abort` (or an error inside a ``with`` block) leaves nothing.
    ``offsets`` is where each sample starts, then where the archive's end marker does: what
    :func:`write_index` keeps for training to read any run of samples with one ranged read.
    """

    FLUSH_BYTES = 1 << 20

    def __init__(self, store: Store, rel: str) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.rel, self.samples = rel, 0
        self._offsets: list[int] = []  # where each sample starts
        self._position = 0
        self._file_cm = store.open_atomic(rel)
        self._file = self._file_cm.__enter__()
        self._digest = hashlib.sha256()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="shard-writer")
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._writes: list[Any] = []
        self._finished = False

    def add(self, item: Decoded) -> None:
        s = item.sample
        text = s.captions[0]
        meta = {"key": s.key, "label": s.label, "captions": s.caption if isinstance(s.caption, list) else None, "meta": s.meta}
        self._offsets.append(self._position)
        for member in (
            _member(f"{s.key}.{item.ext}", item.image_bytes),
            _member(f"{s.key}.txt", text.encode()),
            _member(f"{s.key}.json", json.dumps(meta, default=str).encode()),
        ):
            self._pending.append(member)
            self._pending_bytes += len(member)
            self._position += len(member)
        self.samples += 1
        if self._pending_bytes >= self.FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        data = b"".join(self._pending)
        self._pending, self._pending_bytes = [], 0
        for w in [w for w in self._writes if w.done()]:
            w.result()  # a failed write stops the shard now, not at close
            self._writes.remove(w)
        self._writes.append(self._pool.submit(self._write, data))

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._digest.update(data)

    def close(self) -> dict[str, Any]:
        """End the archive and publish the shard and its index; return its path, sample count and sha256."""
        try:
            self._pending.append(b"\0" * 1024)  # two zero blocks end the archive
            self._flush()
            for w in self._writes:
                w.result()
        except BaseException as e:
            self._finish(e)
            raise
        self._finish(None)
        return {"path": self.rel, "samples": self.samples, "sha256": self._digest.hexdigest()}

    @property
    def offsets(self) -> list[int]:
        return [*self._offsets, self._position]

    def abort(self) -> None:
        """Drop what was written: nothing appears under the shard's name."""
        self._finish(RuntimeError("shard aborted"))

    def _finish(self, error: BaseException | None) -> None:
        if self._finished:
            return
        self._finished = True
        self._pool.shutdown(wait=True)
        if error is None:
            self._file_cm.__exit__(None, None, None)
        else:
            try:
                self._file_cm.__exit__(type(error), error, error.__traceback__)
            except BaseException as raised:  # open_atomic re-raises what it is given
                if raised is not error:
                    raise

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc is not None:
            self.abort()


def write_shards(store: Store, items: Iterable[Decoded], name: Callable[[int], str], per_shard: int) -> list[Shard]:
    """``items`` as tar shards of ``per_shard`` samples (the last holds the rest), the ``n``-th at
    ``name(n)``, each published with its index beside it: training reads them by ranged reads.

    A shard is opened only once an item comes for it, so no items make no shards; on an error the
    open shard is aborted and the ones published stay.
    """
    shards: list[Shard] = []
    writer: ShardWriter | None = None
    try:
        for item in items:
            if writer is None:
                writer = ShardWriter(store, name(len(shards)))
            writer.add(item)
            if writer.samples >= per_shard:
                shards.append(_published(store, writer))
                writer = None
        if writer is not None:
            shards.append(_published(store, writer))
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return shards


def _published(store: Store, writer: ShardWriter) -> Shard:
    shard = Shard.model_validate(writer.close())
    write_index(store, shard.path, writer.offsets)
    return shard


def iter_shard(store: Store, rel: str) -> Iterator[dict[str, Any]]:
    """Yield the raw samples of a shard: ``{"key", "image": bytes, "caption": str | list, "label", "meta"}``.

    A shard clipforge wrote is read strictly: any damage raises :class:`~clipforge.core.tarstream.TarError`.
    """
    with store.open(rel) as f:
        yield from _samples(f, store.uri(rel))


def read_samples(store: Store, rel: str, offsets: np.ndarray, start: int, count: int) -> Iterator[dict[str, Any]]:
    """Samples ``start`` to ``start + count`` of a shard, with one ranged read (``offsets``: its index)."""
    data = store.read_range(rel, int(offsets[start]), int(offsets[start + count]))
    return _samples(io.BytesIO(data), store.uri(rel))


def write_index(store: Store, rel: str, offsets: list[int]) -> None:
    """Keep a shard's sample offsets (:attr:`ShardWriter.offsets`) beside it (:func:`index_of`)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(offsets, dtype=np.int64), allow_pickle=False)
    store.write_bytes(index_of(rel), buf.getvalue())


def read_index(store: Store, rel: str) -> np.ndarray:
    return np.load(io.BytesIO(store.read_bytes(index_of(rel))), allow_pickle=False)


def _samples(f: Any, uri: str) -> Iterator[dict[str, Any]]:
    """The samples of tar bytes clipforge wrote: consecutive members of one key make one sample."""
    current: dict[str, Any] = {}
    try:
        for member in read_members(f):
            if member.kind == "dir":
                continue
            if member.kind != "file":
                raise TarError(f"member {member.name!r} is a {member.kind}, not one clipforge writes")
            key, _, ext = member.name.partition(".")
            if current and current["key"] != key:
                yield _finish(current)
                current = {}
            current["key"] = key
            current[ext] = member.data
    except TarError as e:
        raise TarError(f"{uri}: {e}") from None
    if current:
        yield _finish(current)


def _finish(raw: dict[str, Any]) -> dict[str, Any]:
    meta = json.loads(raw.get("json", b"{}"))
    image = next(raw[e] for e in ("png", "jpg", "webp") if e in raw)
    caption = meta.get("captions") or raw["txt"].decode()
    return {"key": raw["key"], "image": image, "caption": caption, "label": meta.get("label"), "meta": meta.get("meta", {})}
