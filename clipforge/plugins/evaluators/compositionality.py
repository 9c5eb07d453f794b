"""``compositionality``: does the model bind attributes to the right objects?

For every image with two shapes (``meta["shapes"]``, as ``synthetic-shapes`` with
``max_shapes: 2`` records them), the true caption competes with a hard negative built from the
same words: the two colours swapped, "a red circle and a blue square" against "a blue circle
and a red square". A bag-of-words model cannot tell them apart; one that binds colour to shape
can. ``attribute_swap_accuracy`` is how often the true caption is strictly closer to the image;
``relation_swap_accuracy`` does the same with the spatial relation reversed ("a red circle
above a blue square" against "a red circle below a blue square"). Images with one shape are
skipped; chance is 0.5.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

import clipforge
from clipforge import EncoderBundle, Sample, embed_images, embed_texts

NAME = "compositionality"
_CONVERSE = {"above": "below", "below": "above", "to the left of": "to the right of", "to the right of": "to the left of"}


class CompositionalityParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batch_size: int = Field(256, gt=0, description="images or captions per forward pass")


@dataclass
class Compositionality:
    """Attribute-swap (and relation-swap) hard negatives on two-shape images: how often the true caption wins."""

    batch_size: int = 256

    def evaluate(self, bundle: EncoderBundle, dataset: Iterable[Sample], device: str) -> dict[str, float]:
        import torch

        images, samples = embed_images(bundle, dataset, device, self.batch_size, desc=f"{NAME}: images")
        if not samples:
            raise clipforge.ConfigError(f"{NAME}: the dataset is empty")
        pairs = [(i, two) for i, s in enumerate(samples) if (two := _two_shapes(s)) is not None]
        if not pairs:
            raise clipforge.ConfigError(
                f"{NAME}: no sample has two shapes in meta['shapes'] (with colour, shape and relation); "
                "use a dataset such as synthetic-shapes with max_shapes: 2"
            )
        index = torch.tensor([i for i, _ in pairs])
        metrics = {}
        for metric, make in (("attribute_swap_accuracy", attribute_swap), ("relation_swap_accuracy", relation_swap)):
            captions = [make(a, b, rel) for _, (a, b, rel) in pairs]
            true = embed_texts(bundle, [t for t, _ in captions], device, self.batch_size, desc=f"{NAME}: captions")
            false = embed_texts(bundle, [f for _, f in captions], device, self.batch_size, desc=f"{NAME}: negatives")
            wins = (images[index] * true).sum(1) > (images[index] * false).sum(1)
            metrics[metric] = wins.float().mean().item()
        return metrics


def _two_shapes(s: Sample) -> tuple[dict[str, Any], dict[str, Any], str] | None:
    shapes = (s.meta or {}).get("shapes")
    relation = (s.meta or {}).get("relation")
    if not shapes or len(shapes) != 2 or relation not in _CONVERSE:
        return None
    a, b = shapes
    if not all(isinstance(x.get(k), str) for x in (a, b) for k in ("color", "shape")):
        return None
    if a["color"] == b["color"]:  # swapping equal colours makes no negative
        return None
    return a, b, relation


def _phrase(color: str, shape: str) -> str:
    return f"{'an' if color[0] in 'aeiou' else 'a'} {color} {shape}"


def attribute_swap(a: dict[str, Any], b: dict[str, Any], relation: str) -> tuple[str, str]:
    """("a red circle and a blue square", "a blue circle and a red square")."""
    true = f"{_phrase(a['color'], a['shape'])} and {_phrase(b['color'], b['shape'])}"
    return true, f"{_phrase(b['color'], a['shape'])} and {_phrase(a['color'], b['shape'])}"


def relation_swap(a: dict[str, Any], b: dict[str, Any], relation: str) -> tuple[str, str]:
    """("a red circle above a blue square", "a red circle below a blue square")."""
    first, second = _phrase(a["color"], a["shape"]), _phrase(b["color"], b["shape"])
    return f"{first} {relation} {second}", f"{first} {_CONVERSE[relation]} {second}"


@clipforge.hookimpl
def register_evaluators(register):
    register(NAME, Compositionality, params=CompositionalityParams)
