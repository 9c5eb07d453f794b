"""``digits``: scikit-learn's real handwritten digits (``load_digits``), as captioned images.

1,797 scans of digits written by 43 people (the UCI "Optical Recognition of Handwritten
Digits" test set), 8 x 8 pixels of 17 grey levels, shipped inside scikit-learn: no download.
Each becomes dark ink on a white square of ``image_size`` pixels, captioned "a photo of the
digit seven"; classes are the digits' English names, so that zero-shot prompts read naturally.

A domain of its own beside the drawn shapes: ``split: train`` (1,437 digits) to train on and
``split: test`` (the other 360) to evaluate on never see the same scan; ``all`` is both.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

import clipforge
from clipforge import Sample

CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a photo of the digit {c}.", "a photo of the number {c}.", "a handwritten {c}.", "the digit {c}."]
TOTAL, TEST = 1797, 360
#: Which scans each split holds: a fixed shuffle, the same on every machine and in every version.
_SHUFFLED = random.Random("digits-split").sample(range(TOTAL), TOTAL)
SPLITS: dict[str, list[int]] = {"all": list(range(TOTAL)), "train": sorted(_SHUFFLED[TEST:]), "test": sorted(_SHUFFLED[:TEST])}


class DigitsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    split: Literal["all", "train", "test"] = Field(
        "all", description=f"train: {TOTAL - TEST} scans to train on; test: the other {TEST}, to evaluate on; all: both"
    )
    size: int | None = Field(None, gt=0, le=TOTAL, description="a seeded random subset of this many; default the whole split")
    seed: int = Field(0, description="picks the subset")
    image_size: int = Field(32, ge=8, description="side of the square images, in pixels")

    @field_validator("size")
    @classmethod
    def _within_the_split(cls, size: int | None, info: ValidationInfo) -> int | None:
        split = info.data.get("split", "all")
        if size is not None and size > len(SPLITS[split]):
            raise ValueError(f"{size} is more than the {len(SPLITS[split])} digits of split {split!r}")
        return size


class Digits:
    """scikit-learn's handwritten digits; labels are the digit, classes its English name."""

    def __init__(self, size: int | None = None, seed: int = 0, image_size: int = 32, split: str = "all") -> None:
        from sklearn.datasets import load_digits

        DigitsParams.model_validate({"size": size, "seed": seed, "image_size": image_size, "split": split})  # as a recipe entry
        data = load_digits()
        self._images, self._labels = data.images, data.target
        order = SPLITS[split]
        if size is not None:
            order = sorted(random.Random(seed).sample(order, size))
        self._order, self.image_size = order, image_size
        self.classes: list[str] = list(CLASSES)
        self.templates: list[str] = list(TEMPLATES)

    def __len__(self) -> int:
        return len(self._order)

    def __iter__(self) -> Iterator[Sample]:
        return (self[i] for i in range(len(self)))

    def __getitem__(self, i: int) -> Sample:
        index = self._order[i]
        pixels = (255 - self._images[index] * (255 / 16)).round().clip(0, 255).astype("uint8")
        image = Image.fromarray(pixels, mode="L").resize((self.image_size,) * 2, Image.Resampling.BILINEAR).convert("RGB")
        label = int(self._labels[index])
        return Sample(f"digits-{index:04d}", image, f"a photo of the digit {CLASSES[label]}", label=label)


@clipforge.hookimpl
def register_datasets(register):
    register("digits", Digits, params=DigitsParams, description="scikit-learn's 1,797 real handwritten digits, 8x8 scans")
