"""``image-caption-selection``: SugarCrepe's and ARO's test, CLIP_benchmark's ``image_caption_selection``.

Each sample is an image with its captions: the first is the true one, the others are false (a
swapped attribute, a replaced object, a reversed relation), as CLIP_benchmark's SugarCrepe sets
and a ``clip-benchmark`` folder of ``txt`` captions hold them. ``acc`` is how often the true caption
is the one closest to the image (a tie goes to the true caption, as ``argmax`` gives it in
CLIP_benchmark). Samples with ``meta["category"]`` (replace-att, swap-obj, ...) are also scored per
category: ``<category>/acc``. Per-sample results (:class:`~clipforge.ReportsPerSample`) are kept for
``acc``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

import clipforge
from clipforge import EncoderBundle, PerSample, Sample, embed_images, embed_texts

NAME = "image-caption-selection"
_CATEGORY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class CaptionSelectionParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batch_size: int = Field(256, gt=0, description="images or captions per forward pass")


@dataclass
class ImageCaptionSelection:
    """How often the true caption (the first) beats the false ones (the others) for its image."""

    batch_size: int = 256
    #: After ``evaluate``: per-sample results by metric (what a paired bootstrap resamples).
    per_sample: dict[str, PerSample] = field(default_factory=dict, init=False, repr=False)

    def evaluate(self, bundle: EncoderBundle, dataset: Iterable[Sample], device: str) -> dict[str, float]:
        import torch

        images, samples = embed_images(bundle, dataset, device, self.batch_size, desc=f"{NAME}: images", check=_check)
        if not samples:
            raise clipforge.ConfigError(f"{NAME}: the dataset is empty")
        counts = [len(s.captions) for s in samples]
        texts = embed_texts(bundle, [c for s in samples for c in s.captions], device, self.batch_size, desc=f"{NAME}: captions")
        owner = torch.repeat_interleave(torch.tensor(counts))
        scores = (texts * images[owner]).sum(dim=1)  # each caption's similarity to its own image
        starts = torch.tensor([0, *torch.cumsum(torch.tensor(counts), 0)[:-1].tolist()])
        right = torch.tensor([bool(scores[a : a + n].argmax() == 0) for a, n in zip(starts.tolist(), counts, strict=True)])
        keys = [s.key for s in samples]
        metrics = {"acc": right.double().mean().item()}
        self.per_sample = {"acc": PerSample(keys, right.double().tolist())}
        categories = [s.meta.get("category") for s in samples]
        for category in sorted({c for c in categories if c is not None}):
            mine = torch.tensor([c == category for c in categories])
            metrics[f"{category}/acc"] = right[mine].double().mean().item()
        return metrics


def _check(s: Sample) -> None:
    if len(s.captions) < 2 or not all(s.captions) or (isinstance(s.caption, list) and len(s.captions) != len(s.caption)):
        raise clipforge.ConfigError(
            f"{NAME}: sample {s.key!r} needs a list of captions, the true one first and at least one false one; got {s.caption!r}"
        )
    category = s.meta.get("category")
    if category is not None and not (isinstance(category, str) and _CATEGORY.match(category)):
        raise clipforge.ConfigError(f"{NAME}: sample {s.key!r} has category {category!r}: letters, digits, '.', '_', '-'")


@clipforge.hookimpl
def register_evaluators(register):
    register(NAME, ImageCaptionSelection, params=CaptionSelectionParams)
