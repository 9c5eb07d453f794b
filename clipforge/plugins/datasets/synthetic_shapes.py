"""``synthetic-shapes``: coloured shapes on a plain background, with captions; needs no download.

Each image holds a *main* shape and, sometimes, a smaller second one of another colour and
kind, placed above, below, left or right of it. The label is the main shape's
``"<color> <shape>"`` class; captions always mention the main shape first. A tiny CLIP
trained on a CPU for a minute is far above chance at zero-shot classification of the 30
classes: it learns colour within a few hundred steps, shape more slowly.

Every sample is derived from ``(seed, index)`` alone: the same seed gives the same bytes and
captions in any iteration order, on any machine, and ``dataset[i]`` is random access.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field

import clipforge
from clipforge.core.components import Sample

#: Fill colours, far apart in hue so that even 32 px images keep them apart.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 30),
    "green": (35, 150, 45),
    "blue": (35, 75, 215),
    "yellow": (230, 195, 0),
    "purple": (135, 45, 175),
    "orange": (245, 125, 0),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")

#: Zero-shot prompt templates, worded like the training captions.
TEMPLATES: tuple[str, ...] = (
    "a photo of a {c}.",
    "a {c}.",
    "a drawing of a {c}.",
    "a {c} on a plain background.",
)

# Caption phrasings; {a} is the main shape's noun phrase ("a large red circle"), {b} the
# second one's, {rel} where the main shape is relative to the second, {inv} the converse.
_ONE_SHAPE = (
    "{a}",
    "a photo of {a}",
    "a drawing of {a}",
    "an image of {a} on a plain background",
    "{a} on a light background",
    "a picture showing {a}",
)
_TWO_SHAPES = (
    "{a} {rel} {b}",
    "a photo of {a} {rel} {b}",
    "a drawing of {a} {rel} {b}",
    "{a} and {b}",
    "{a} with {b} {inv} it",
    "an image of {a} and {b}",
)
_SUPERSAMPLE = 4
_CONVERSE = {
    "above": "below",
    "below": "above",
    "to the left of": "to the right of",
    "to the right of": "to the left of",
}

# Unit outlines (max vertex norm 1), so a shape of radius r stays inside its bounding circle.
_OUTLINES: dict[str, list[tuple[float, float]]] = {
    "square": [(math.cos(a), math.sin(a)) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))],
    "triangle": [(math.cos(a), math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))],
    "star": [
        (r * math.cos(a), r * math.sin(a))
        for k in range(10)
        for r, a in [(1.0 if k % 2 == 0 else 0.45, -math.pi / 2 + k * math.pi / 5)]
    ],
    "cross": [
        (x / math.hypot(1, 0.32), y / math.hypot(1, 0.32))
        for x, y in [
            (-0.32, -1),
            (0.32, -1),
            (0.32, -0.32),
            (1, -0.32),
            (1, 0.32),
            (0.32, 0.32),
            (0.32, 1),
            (-0.32, 1),
            (-0.32, 0.32),
            (-1, 0.32),
            (-1, -0.32),
            (-0.32, -0.32),
        ]
    ],
}


class SyntheticShapesParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: int = Field(gt=0, description="number of samples")
    seed: int = Field(0, description="same seed, same samples")
    image_size: int = Field(64, ge=16, description="side of the square images, in pixels")
    max_shapes: int = Field(2, ge=1, le=2, description="1: one shape per image; 2: half the images get a second")
    captions_per_image: int = Field(1, ge=1, le=8, description=">1: a list of distinct captions per image")
    defects: float = Field(0.0, ge=0.0, le=1.0, description="fraction of samples given a crawl's defect, for curation to catch")
    offset: int = Field(0, ge=0, description="index of the first sample: a part of a larger dataset")


# What a web crawl really hands you; curation must drop each with its reason.
DEFECTS = ("truncated image", "not an image", "empty caption", "one-word caption")


@dataclass(frozen=True)
class _Shape:
    color: str
    shape: str
    size: str  # "large" or "small"
    x: float
    y: float
    radius: float

    def phrase(self, with_size: bool) -> str:
        words = f"{self.size} {self.color} {self.shape}" if with_size else f"{self.color} {self.shape}"
        return ("an " if words[0] in "aeiou" else "a ") + words


class SyntheticShapes:
    """Coloured shapes with captions; labels are the main shape's colour x shape class."""

    def __init__(
        self,
        size: int,
        seed: int = 0,
        image_size: int = 64,
        max_shapes: int = 2,
        captions_per_image: int = 1,
        defects: float = 0.0,
        offset: int = 0,
    ) -> None:
        self.size, self.seed, self.image_size, self.offset = size, seed, image_size, offset
        self.max_shapes, self.captions_per_image, self.defects = max_shapes, captions_per_image, defects
        self.classes: list[str] = [f"{c} {s}" for c in COLORS for s in SHAPES]
        self.templates: list[str] = list(TEMPLATES)

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[Sample]:
        return (self[i] for i in range(self.size))

    def parts(self, part_size: int = 2000) -> list[dict[str, Any]]:
        """Dataset entries of consecutive slices, for curation to process in parallel."""
        base = {
            "type": "synthetic-shapes", "seed": self.seed, "image_size": self.image_size, "max_shapes": self.max_shapes,
            "captions_per_image": self.captions_per_image, "defects": self.defects,
        }  # fmt: skip
        return [
            {**base, "offset": self.offset + start, "size": min(part_size, self.size - start)}
            for start in range(0, self.size, part_size)
        ]

    def __getitem__(self, i: int) -> Sample:
        if not 0 <= i < self.size:
            raise IndexError(f"synthetic-shapes: index {i} out of range for size {self.size}")
        i += self.offset
        rng = random.Random(f"{self.seed}-{i}")  # per index: independent of iteration order
        shapes, relation = self._layout(rng)
        main = shapes[0]
        background = _jitter(rng, (rng.randint(218, 250),) * 3, 6)  # light grey, slightly tinted
        # Drawn at _SUPERSAMPLE times the size and box-filtered down: smooth edges keep small
        # rotated shapes recognisable at 32 px instead of turning them into jagged blobs.
        canvas = Image.new("RGB", (self.image_size * _SUPERSAMPLE,) * 2, background)
        draw = ImageDraw.Draw(canvas)
        for s in shapes:
            _draw(draw, s, _jitter(rng, COLORS[s.color], 12), rng)
        image = canvas.resize((self.image_size,) * 2, Image.Resampling.BOX)
        phrasings = _captions(shapes, relation)
        captions = rng.sample(phrasings, min(self.captions_per_image, len(phrasings)))
        meta: dict[str, Any] = {
            "shapes": [
                {"color": s.color, "shape": s.shape, "size": s.size, "x": s.x, "y": s.y, "radius": s.radius} for s in shapes
            ],
            "relation": relation,
        }
        sample = Sample(
            key=f"shapes-{self.seed}-{i:07d}",
            image=image,
            caption=captions[0] if self.captions_per_image == 1 else captions,
            label=self.classes.index(f"{main.color} {main.shape}"),
            meta=meta,
        )
        return self._spoil(sample, i) if self.defects else sample

    def _spoil(self, sample: Sample, i: int) -> Sample:
        # A separate generator: the clean samples stay what they are without defects.
        rng = random.Random(f"defects-{self.seed}-{i}")
        if rng.random() >= self.defects:
            return sample
        defect = rng.choice(DEFECTS)
        sample.meta["defect"] = defect
        if defect in ("truncated image", "not an image"):
            buf = io.BytesIO()
            sample.image.save(buf, format="PNG")
            png = buf.getvalue()
            sample.image = png[: len(png) // 2] if defect == "truncated image" else b"<html>404 Not Found</html>"
        elif defect == "empty caption":
            sample.caption = ""
        else:
            sample.caption = sample.meta["shapes"][0]["color"]
        return sample

    def _layout(self, rng: random.Random) -> tuple[list[_Shape], str | None]:
        """The shapes, main first, and where the main one is relative to the second (or None)."""
        extent = self.image_size  # coordinates run 0..extent over the image; shapes never cross it
        # Radii are fractions of the side, as large as the layout allows: a tiny ViT learns colour
        # at once but shape only slowly, and the bigger the shapes the sooner (tried at 32 px).
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        if self.max_shapes == 1 or rng.random() < 0.5:
            size = rng.choice(("large", "small"))
            r = extent * (rng.uniform(0.26, 0.38) if size == "large" else rng.uniform(0.15, 0.2))
            x, y = rng.uniform(r, extent - r), rng.uniform(r, extent - r)
            return [_Shape(color, shape, size, round(x, 2), round(y, 2), round(r, 2))], None
        # Second shape: another colour and another kind, so the caption names two distinct objects.
        color2 = rng.choice([c for c in COLORS if c != color])
        shape2 = rng.choice([s for s in SHAPES if s != shape])
        r1, r2 = extent * rng.uniform(0.2, 0.245), extent * rng.uniform(0.12, 0.16)
        relation = rng.choice(list(_CONVERSE))
        # Each shape lives in its own half along the relation's axis; across it, the two stay
        # within 0.1 of the middle, so the named relation is always the dominant offset.
        first_half = relation in ("above", "to the left of")
        half = extent / 2
        a1 = rng.uniform(r1, half - r1) if first_half else rng.uniform(half + r1, extent - r1)
        a2 = rng.uniform(half + r2, extent - r2) if first_half else rng.uniform(r2, half - r2)
        o1, o2 = (half + extent * rng.uniform(-0.1, 0.1) for _ in range(2))
        (x1, y1), (x2, y2) = ((o1, a1), (o2, a2)) if relation in ("above", "below") else ((a1, o1), (a2, o2))
        return [
            _Shape(color, shape, "large", round(x1, 2), round(y1, 2), round(r1, 2)),
            _Shape(color2, shape2, "small", round(x2, 2), round(y2, 2), round(r2, 2)),
        ], relation


def _captions(shapes: list[_Shape], relation: str | None) -> list[str]:
    """Every distinct phrasing of this image, in a fixed order."""
    if relation is None:
        forms = [t.format(a=shapes[0].phrase(sized)) for t in _ONE_SHAPE for sized in (True, False)]
    else:
        forms = [
            t.format(a=shapes[0].phrase(sized), b=shapes[1].phrase(sized), rel=relation, inv=_CONVERSE[relation])
            for t in _TWO_SHAPES
            for sized in (True, False)
        ]
    return list(dict.fromkeys(forms))


def _jitter(rng: random.Random, rgb: tuple[int, ...], amount: int) -> tuple[int, int, int]:
    r, g, b = (max(0, min(255, v + rng.randint(-amount, amount))) for v in rgb)
    return r, g, b


def _draw(draw: ImageDraw.ImageDraw, s: _Shape, fill: tuple[int, int, int], rng: random.Random) -> None:
    """Draw ``s`` on the supersampled canvas."""
    x, y, r = (v * _SUPERSAMPLE for v in (s.x, s.y, s.radius))
    if s.shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        return
    turn = math.radians(rng.uniform(-15, 15))  # a little rotation; never enough to make a square a diamond
    cos, sin = math.cos(turn), math.sin(turn)
    points = [(x + r * (u * cos - v * sin), y + r * (u * sin + v * cos)) for u, v in _OUTLINES[s.shape]]
    draw.polygon(points, fill=fill)


@clipforge.hookimpl
def register_datasets(register):
    register(
        "synthetic-shapes",
        SyntheticShapes,
        params=SyntheticShapesParams,
        description="coloured shapes with captions, generated from a seed; labels are colour x shape classes",
    )
