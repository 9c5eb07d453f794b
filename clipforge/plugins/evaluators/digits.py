"""``digits``: zero-shot classification of scikit-learn's real handwritten digits.

A check on data that no one here drew: the evaluator brings its own dataset (the ``digits``
dataset plugin) and ignores the recipe's ``data.eval``; the prompts are the dataset's ("a
photo of the digit seven.") unless ``templates`` are given. Metrics are those of
``zero-shot-classification``: ``acc1``, ``acc5``, ``mean_per_class_recall``; chance is 0.1.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

from pydantic import Field

import clipforge
from clipforge import EncoderBundle, Sample
from clipforge.plugins.datasets.digits import Digits
from clipforge.plugins.evaluators.zero_shot import ZeroShotClassification, ZeroShotParams

NAME = "digits"


class DigitsEvalParams(ZeroShotParams):
    size: int | None = Field(None, gt=0, le=1797, description="a seeded random subset of this many digits; default all")
    seed: int = Field(0, description="picks the subset")
    image_size: int = Field(32, ge=8, description="side of the rendered digits, in pixels (the model's preprocessing resizes)")


@dataclass
class DigitsZeroShot(ZeroShotClassification):
    """Zero-shot classification of scikit-learn's handwritten digits ("a photo of the digit seven.")."""

    size: int | None = None
    seed: int = 0
    image_size: int = 32
    name: ClassVar[str] = NAME

    def evaluate(self, bundle: EncoderBundle, dataset: Iterable[Sample], device: str) -> dict[str, float]:
        digits = Digits(size=self.size, seed=self.seed, image_size=self.image_size)
        return super().evaluate(bundle, digits, device)


@clipforge.hookimpl
def register_evaluators(register):
    register(NAME, DigitsZeroShot, params=DigitsEvalParams)
