"""Task folders written by CLIP_benchmark's own converter from small real data (scikit-learn's
digits), and a tiny exported open_clip model: what the clip-benchmark tests and the suite tests read."""

from __future__ import annotations

import contextlib
import io
import random
from pathlib import Path

import numpy as np
import torch

from tests.conftest import TINY_CONFIG

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a photo of the digit {c}.", "a handwritten {c}."]
#: multilabel classes: the digit, and whether it is even / greater than four
MULTI = [*NAMES, "even", "big"]


class _Images(torch.utils.data.Dataset):
    """(PIL image, target) pairs of the digits, as convert_dataset takes them."""

    def __init__(self, n: int, seed: int, kind: str) -> None:
        from sklearn.datasets import load_digits

        data = load_digits()
        order = random.Random(seed).sample(range(len(data.target)), n)
        self.images = [data.images[i] for i in order]
        self.labels = [int(data.target[i]) for i in order]
        self.kind = kind
        self.classes = MULTI if kind == "multilabel" else NAMES
        self.templates = TEMPLATES

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        pixels = (255 - self.images[i] * (255 / 16)).round().clip(0, 255).astype("uint8")
        image = Image.fromarray(pixels, mode="L").resize((32, 32)).convert("RGB")
        buf = io.BytesIO()
        image.save(buf, format="png")
        y = self.labels[i]
        if self.kind == "multilabel":
            return buf.getvalue(), np.array([int(j == y) for j in range(10)] + [int(y % 2 == 0), int(y > 4)])
        if self.kind == "retrieval":
            # captions unique to the scan: equal captions would tie, and ties break by position
            captions = [f"{t.format(c=NAMES[y])} scan {i}" for t in TEMPLATES]
            return buf.getvalue(), captions[i % 2 :] + captions[: i % 2]  # which caption comes first varies
        return buf.getvalue(), y


def write_task(folder: Path, kind: str, n: int, seed: int = 0, max_count: int = 10_000) -> Path:
    """A task folder of ``n`` digits written by clip_benchmark.webdataset_builder (``kind``:
    classification, multilabel or retrieval); ``max_count`` samples a shard."""
    from clip_benchmark import webdataset_builder as wb

    data = _Images(n, seed, kind)
    # the converter's DataLoader forks 8 workers: one process is enough for a few hundred images
    loader = torch.utils.data.DataLoader

    def serial(dataset, **kw):
        kw["num_workers"] = 0
        return loader(dataset, **kw)

    wb.torch.utils.data.DataLoader = serial
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            if kind == "retrieval":
                wb.convert_retrieval_dataset(data, "test", str(folder), image_format="png", max_count=max_count, verbose=False)
            else:
                wb.convert_dataset(
                    data,
                    "test",
                    str(folder),
                    image_format="png",
                    max_count=max_count,
                    multilabel=kind == "multilabel",
                    verbose=False,
                )
    finally:
        wb.torch.utils.data.DataLoader = loader
    return folder


def export_tiny_model(folder: Path, seed: int = 0) -> Path:
    """A tiny open_clip model with seeded random weights, as an open_clip local-dir folder."""
    from clipforge.core.checkpoint import save_open_clip_dir
    from clipforge.core.plugins import PluginManager

    torch.manual_seed(seed)
    bundle = PluginManager(load_entry_points=False).catalog.create("encoders", {"type": "open-clip", "config": TINY_CONFIG})
    return save_open_clip_dir(bundle, folder)
