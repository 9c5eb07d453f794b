"""Curated shards: webdataset-layout tar files (``KEY.png|jpg|webp``, ``KEY.txt``, ``KEY.json``) on the store."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from PIL import Image

from clipforge.core.components import Sample
from clipforge.core.storage import Store

# A key becomes a tar member name: no path traversal, no dots (webdataset splits the extension at the first dot).
_KEY = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*$")
_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
MAX_CAPTION_CHARS = 10_000


class BadSample(ValueError):
    """A sample that cannot be used; the message is the reason recorded in the manifest."""


@dataclass
class Decoded:
    """A sample checked and decoded: the PIL image for the curation steps, the bytes for the shard."""

    sample: Sample
    image_bytes: bytes
    ext: str


def decode(sample: Sample) -> Decoded:
    """Check a raw sample and decode its image, or raise :class:`BadSample` with the reason."""
    if sample.meta.get("error"):  # the dataset could not read this sample and says why
        raise BadSample(str(sample.meta["error"]))
    key = sample.key
    if not isinstance(key, str) or not _KEY.match(key) or len(key) > 200:
        raise BadSample("invalid key")
    captions = sample.caption if isinstance(sample.caption, list) else [sample.caption]
    if not captions or any(c is None for c in captions):
        raise BadSample("missing caption")
    if any(isinstance(c, bytes) for c in captions):
        try:
            captions = [c.decode("utf-8") if isinstance(c, bytes) else c for c in captions]
        except UnicodeDecodeError:
            raise BadSample("caption is not UTF-8") from None
    if not all(isinstance(c, str) for c in captions):
        raise BadSample("caption is not text")
    if any(not c.strip() for c in captions):
        raise BadSample("empty caption")
    if any(len(c) > MAX_CAPTION_CHARS for c in captions):
        raise BadSample(f"caption longer than {MAX_CAPTION_CHARS} characters")
    image = sample.image
    try:
        if isinstance(image, (bytes, bytearray)):
            if not image:
                raise BadSample("empty image file")
            pil = Image.open(io.BytesIO(image))
            fmt = pil.format
            pil.load()  # decodes fully: truncated files fail here, not later in training
            ext = _FORMATS.get(fmt or "")
            data = bytes(image) if ext else _png(pil)
            ext = ext or "png"
        elif isinstance(image, Image.Image):
            pil, data, ext = image, _png(image), "png"
        else:
            raise BadSample("no image")
        if pil.mode != "RGB":  # convert copies even when there is nothing to convert
            pil = pil.convert("RGB")
    except BadSample:
        raise
    except Image.DecompressionBombError:
        raise BadSample("decompression bomb") from None
    except Exception as e:  # PIL raises a zoo of types for corrupt data
        raise BadSample(f"undecodable image ({type(e).__name__})") from None
    caption = captions if isinstance(sample.caption, list) else captions[0]
    clean = Sample(key=key, image=pil, caption=caption, label=sample.label, meta=dict(sample.meta))
    return Decoded(clean, data, ext)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def _member(name: str, data: bytes) -> bytes:
    """One ustar member, header and padded data: tarfile's own writer costs more than decoding a small image."""
    if len(name) > 100 or not name.isascii():  # long names need the prefix field: leave those to tarfile
        info = tarfile.TarInfo(name)
        info.size = len(data)
        header = info.tobuf(format=tarfile.USTAR_FORMAT)
    else:
        header = bytearray(512)
        header[0 : len(name)] = name.encode()
        header[100:108] = b"0000644\0"
        header[108:116] = header[116:124] = b"0000000\0"
        header[124:136] = b"%011o\0" % len(data)
        header[136:148] = b"00000000000\0"
        header[148:156] = b" " * 8
        header[156:157] = b"0"
        header[257:265] = b"ustar\x0000"
        header[148:155] = b"%06o\0" % sum(header)
        header = bytes(header)
    return header + data + b"\0" * (-len(data) % 512)


def write_shard(store: Store, rel: str, items: list[Decoded]) -> dict[str, Any]:
    """Write one tar shard atomically; return its path, sample count and sha256."""
    chunks: list[bytes] = []
    for item in items:
        s = item.sample
        text = s.caption if isinstance(s.caption, str) else s.caption[0]
        meta = {"key": s.key, "label": s.label, "captions": s.caption if isinstance(s.caption, list) else None, "meta": s.meta}
        chunks.append(_member(f"{s.key}.{item.ext}", item.image_bytes))
        chunks.append(_member(f"{s.key}.txt", text.encode()))
        chunks.append(_member(f"{s.key}.json", json.dumps(meta, default=str).encode()))
    chunks.append(b"\0" * 1024)  # end of archive
    data = b"".join(chunks)
    store.write_bytes(rel, data)
    return {"path": rel, "samples": len(items), "sha256": hashlib.sha256(data).hexdigest()}


def iter_shard(store: Store, rel: str) -> Iterator[dict[str, Any]]:
    """Yield the raw samples of a shard: ``{"key", "image": bytes, "caption": str | list, "label", "meta"}``."""
    with store.open(rel) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        current: dict[str, Any] = {}
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            if current and current["key"] != key:
                yield _finish(current)
                current = {}
            current["key"] = key
            current[ext] = tar.extractfile(member).read()
        if current:
            yield _finish(current)


def _finish(raw: dict[str, Any]) -> dict[str, Any]:
    meta = json.loads(raw.get("json", b"{}"))
    image = next(raw[e] for e in ("png", "jpg", "webp") if e in raw)
    caption = meta.get("captions") or raw["txt"].decode()
    return {"key": raw["key"], "image": image, "caption": caption, "label": meta.get("label"), "meta": meta.get("meta", {})}
