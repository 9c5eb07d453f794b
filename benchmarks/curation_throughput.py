"""Curation throughput: decode-only vs the basic filters on the same shards.

    python benchmarks/curation_throughput.py [--images 4000]

Prints pairs/s of reading the shards alone (the webdataset dataset, no decoding), of decoding
alone (read the shards, decode every image fully), pairs/s of a
curation part with DataComp's basic filters (caption length, image size) on the same shards
(target: >= 90 % of decode-only; the images those filters drop are never fully decoded), the
same with thresholds that keep every pair (every image decoded and staged). Near-duplicates at
scale are measured by ``dedup.py``.
"""

from __future__ import annotations

import argparse
import io
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import clipforge
from clipforge.core.storage import Store
from clipforge.core.validation import load_recipe
from clipforge.engine import curation
from clipforge.engine.curation.parts import PartJob
from clipforge.engine.shards import decode


def make_shards(folder: Path, n: int, per_shard: int = 1000) -> str:
    rng = np.random.default_rng(0)
    for s in range(0, n, per_shard):
        with tarfile.open(folder / f"shard-{s // per_shard:05d}.tar", "w") as tar:
            for k in range(s, min(n, s + per_shard)):
                w, h = int(rng.integers(160, 320)), int(rng.integers(160, 320))
                pixels = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels).resize((w, h)).save(buf, format="JPEG", quality=85)
                caption = " ".join(
                    rng.choice(["a", "photo", "of", "red", "dog", "on", "grass", "the", "cat"], int(rng.integers(1, 12)))
                )
                for name, data in ((f"{k:08d}.jpg", buf.getvalue()), (f"{k:08d}.txt", caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / "shard-*.tar")


def read_only(urls: str) -> float:
    dataset = clipforge.get_plugin_manager().catalog.create("datasets", {"type": "webdataset", "urls": urls})
    start = time.perf_counter()
    n = sum(1 for _ in dataset)
    return n / (time.perf_counter() - start)


def decode_only(urls: str) -> float:
    dataset = clipforge.get_plugin_manager().catalog.create("datasets", {"type": "webdataset", "urls": urls})
    start, n = time.perf_counter(), 0
    for sample in dataset:
        decode(sample)
        n += 1
    return n / (time.perf_counter() - start)


DATACOMP = [{"type": "caption-length", "min_words": 3}, {"type": "image-size", "min_side": 200, "max_aspect": 3}]
KEEP_ALL = [{"type": "caption-length", "min_words": 1}, {"type": "image-size", "min_side": 1}]


def basic_filters(urls: str, root: str, steps: list[dict]) -> float:
    recipe = load_recipe(
        {
            "name": "bench",
            "storage": {"root": root},
            "data": {"train": {"type": "webdataset", "urls": urls}},
            "curation": steps,
            "model": {"type": "open-clip", "arch": "ViT-B-32"},
        }
    )
    catalog, store = clipforge.get_plugin_manager().catalog, Store(root)
    start, n = time.perf_counter(), 0
    for i, entry in enumerate(curation.parts_of(recipe, catalog)):
        n += curation.curate_part(PartJob(recipe=recipe, store=store.url, out="out", index=i, entry=entry)).input
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=4000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "warm").mkdir()
        (Path(tmp) / "data").mkdir()
        basic_filters(make_shards(Path(tmp) / "warm", 20), f"{tmp}/warm/store", DATACOMP)  # the imports, outside the timing
        urls = make_shards(Path(tmp) / "data", args.images)
        # alternated, best of three each: a busy machine slows all alike
        rates = [
            (
                read_only(urls),
                decode_only(urls),
                basic_filters(urls, f"{tmp}/dc{i}", DATACOMP),
                basic_filters(urls, f"{tmp}/all{i}", KEEP_ALL),
            )
            for i in range(3)
        ]
        read_rate, decode_rate, filter_rate, keep_all_rate = (max(r[j] for r in rates) for j in range(4))
    print(f"read only:           {read_rate:8.0f} pairs/s (the shards' samples, nothing decoded)")
    print(f"decode only:         {decode_rate:8.0f} pairs/s ({args.images} JPEG pairs, 160-320 px)")
    print(
        f"basic filters:       {filter_rate:8.0f} pairs/s (DataComp's: >= 3 words, side >= 200 px, aspect <= 3; survivors staged)"
    )
    print(f"ratio:               {filter_rate / decode_rate:8.2f} (target >= 0.90)")
    print(f"filters keeping all: {keep_all_rate:8.0f} pairs/s (every image decoded and staged: the per-pair overhead)")
    print(f"ratio:               {keep_all_rate / decode_rate:8.2f}")


if __name__ == "__main__":
    main()
