"""``example-digits``: scikit-learn's handwritten digits (UCI optdigits test set, 1,797 8x8 scans) with captions.

The images ship inside scikit-learn: nothing is downloaded. Each scan is scaled up to
``image_size`` and captioned from one of a few phrasings (``"a photo of the digit seven"``,
``"a handwritten 7"``...); the label is the digit. ``split="test"`` is every fifth digit,
``split="train"`` the others, so the two never overlap. ``blank`` replaces that fraction of the
scans with an empty page, the kind of defect ``example-contrast`` is there to catch.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from functools import cached_property

import numpy as np
from PIL import Image

from clipforge import Sample

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: Zero-shot prompts, worded like the captions; ``{c}`` is the digit's name.
TEMPLATES = ("a photo of the digit {c}.", "a handwritten {c}.", "the number {c}, written by hand.")
_CAPTIONS = (
    "a photo of the digit {name}",
    "a handwritten {name}",
    "a handwritten {digit}",
    "the number {name}, written by hand",
    "a scan of the digit {digit}",
)


class Digits:
    """Handwritten digits with captions; a classification dataset (``classes``, ``templates``)."""

    def __init__(self, split: str = "all", image_size: int = 32, blank: float = 0.0, seed: int = 0) -> None:
        if split not in ("train", "test", "all"):
            raise ValueError(f"example-digits: split must be train, test or all, not {split!r}")
        self.split, self.image_size, self.blank, self.seed = split, image_size, blank, seed
        self.classes: list[str] = list(NAMES)
        self.templates: list[str] = list(TEMPLATES)

    @cached_property
    def _data(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from sklearn.datasets import load_digits  # bundled with scikit-learn; imported on first use

        digits = load_digits()
        index = np.arange(len(digits.target))
        keep = {"all": index >= 0, "test": index % 5 == 0, "train": index % 5 != 0}[self.split]
        return index[keep], digits.images[keep], digits.target[keep]

    def __len__(self) -> int:
        return len(self._data[0])

    def __iter__(self) -> Iterator[Sample]:
        return (self[i] for i in range(len(self)))

    def __getitem__(self, i: int) -> Sample:
        index, images, targets = self._data
        n = int(index[i])  # the position in the full set: keys and captions do not depend on the split
        rng = random.Random(f"{self.seed}-{n}")
        digit = int(targets[i])
        caption = rng.choice(_CAPTIONS).format(name=NAMES[digit], digit=digit)
        scan = images[i]
        meta = {"index": n}
        if self.blank and rng.random() < self.blank:
            scan = np.zeros_like(scan)
            meta["defect"] = "blank scan"
        # ink is 0..16; dark ink on white paper, as a photo of a written digit would be
        grey = (255 - scan * (255 / 16)).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(grey, mode="L").resize((self.image_size,) * 2, Image.Resampling.BICUBIC).convert("RGB")
        return Sample(key=f"digits-{n:04d}", image=image, caption=caption, label=digit, meta=meta)
