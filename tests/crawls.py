"""Crawls made for the tests: img2dataset-style webdataset shards with planted groups of copies.

img2dataset writes ``00000.tar`` holding ``KEY.jpg``, ``KEY.txt`` and ``KEY.json`` per sample,
with ``00000.parquet`` (one row per sample) and ``00000_stats.json`` beside it; :func:`write_shards`
writes the same layout, so the tests read what a real crawl leaves.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


@dataclass
class CrawlSample:
    key: str
    image: bytes
    caption: str
    ext: str = "jpg"
    meta: dict[str, Any] = field(default_factory=dict)


def noise_pixels(seed: int, side: int = 48) -> np.ndarray:
    """A random RGB image: two of them are never near copies of each other."""
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


def encode(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def near_copy(pixels: np.ndarray, seed: int, how: str) -> tuple[bytes, str]:
    """A copy as the web makes them: the same bytes, re-encoded as JPEG, speckled with noise, or resized."""
    rng = np.random.default_rng(seed)
    if how == "identical":
        return encode(pixels), "png"
    if how == "jpeg":
        return encode(pixels, "JPEG"), "jpg"
    if how == "noise":
        noisy = np.clip(pixels.astype(np.int16) + rng.integers(-8, 9, pixels.shape), 0, 255).astype(np.uint8)
        return encode(noisy), "png"
    side = pixels.shape[0]
    resized = np.asarray(Image.fromarray(pixels).resize((side * 4 // 3, side * 4 // 3), Image.Resampling.BICUBIC))
    return encode(resized), "png"


def planted_crawl(sizes: list[int], singles: int, *, seed: int = 0, prefix: str = "s",
                  captions: list[str] | None = None) -> tuple[list[CrawlSample], list[list[str]]]:  # fmt: skip
    """Groups of copies of the given sizes (identical and near copies mixed) and ``singles`` unique images,
    shuffled; returns the samples in input order and each group's keys in input order."""
    rng = np.random.default_rng(seed)
    items: list[tuple[int, bytes, str]] = []  # (group or -1, image, ext)
    for g, size in enumerate(sizes):
        base = noise_pixels(seed * 100_003 + g)
        for m in range(size):
            how = ["identical", "jpeg", "noise", "resize"][m % 4]
            image, ext = near_copy(base, seed * 7919 + g * 1000 + m, how)
            items.append((g, image, ext))
    for u in range(singles):
        items.append((-1, encode(noise_pixels(seed * 100_003 + 50_000 + u)), "png"))
    order = rng.permutation(len(items))
    samples, groups = [], [[] for _ in sizes]
    for position, i in enumerate(order):
        g, image, ext = items[i]
        key = f"{prefix}{position:06d}"
        caption = captions[position % len(captions)] if captions else f"a photo numbered {position}"
        samples.append(CrawlSample(key, image, caption, ext, {"url": f"https://example.com/{key}.{ext}"}))
        if g >= 0:
            groups[g].append(key)
    return samples, groups


def write_shards(folder: Path, samples: list[CrawlSample], per_shard: int) -> str:
    """img2dataset's output layout; returns the brace pattern of the shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    n_shards = max(1, -(-len(samples) // per_shard))
    for s in range(n_shards):
        chunk = samples[s * per_shard : (s + 1) * per_shard]
        rows = []
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for sample in chunk:
                meta = {"key": sample.key, "caption": sample.caption, "status": "success", "error_message": None,
                        **sample.meta}  # fmt: skip
                for name, data in (
                    (f"{sample.key}.{sample.ext}", sample.image),
                    (f"{sample.key}.txt", sample.caption.encode()),
                    (f"{sample.key}.json", json.dumps(meta).encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                rows.append(meta)
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{s:05d}.parquet")
        (folder / f"{s:05d}_stats.json").write_text(json.dumps({"count": len(chunk), "successes": len(chunk)}))
    return str(folder / f"{{00000..{n_shards - 1:05d}}}.tar")
