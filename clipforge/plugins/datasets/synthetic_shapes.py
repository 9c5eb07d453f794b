"""``synthetic-shapes``: coloured shapes with captions, in a style of your choice; needs no download.

Each image holds a *main* shape and, sometimes, a smaller second one of another colour and
kind, placed above, below, left or right of it. The label is the main shape's
``"<color> <shape>"`` class; captions always mention the main shape first. A tiny CLIP
trained on a CPU for a minute is far above chance at zero-shot classification of the 30
classes: it learns colour within a few hundred steps, shape more slowly.

A *domain* is a choice of colours, shapes and style: filled or outlined shapes, on a plain,
textured or dark background, at a range of sizes and rotations. Its classes are the colour x
shape classes it draws, and its captions and prompt templates say what the style shows
("a red star outline on a textured background"), as web captions would. The defaults are the
demo's domain, sample for sample: six colours, five shapes, filled, on a plain light background.

Every sample is derived from ``(seed, index)`` (and the domain) alone: the same seed gives the
same bytes and captions in any iteration order, on any machine, and ``dataset[i]`` is random
access. Another domain draws other samples from the same seed, under other keys.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

import clipforge
from clipforge import Sample

#: Every colour the dataset draws, far apart in hue so that even 32 px images keep them apart.
ALL_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 30),
    "green": (35, 150, 45),
    "blue": (35, 75, 215),
    "yellow": (230, 195, 0),
    "purple": (135, 45, 175),
    "orange": (245, 125, 0),
    "pink": (240, 120, 190),
    "cyan": (0, 185, 200),
    "brown": (120, 70, 25),
}
#: The colours drawn by default (the demo's).
COLORS: dict[str, tuple[int, int, int]] = {c: ALL_COLORS[c] for c in ("red", "green", "blue", "yellow", "purple", "orange")}

#: Every shape the dataset draws, and those drawn by default.
ALL_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "hexagon", "heart")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")

FILLS = ("filled", "outline")
#: Backgrounds, and the two words captions use for each ("on a plain background", "on a light background").
BACKGROUNDS: dict[str, tuple[str, str]] = {
    "plain": ("plain", "light"),
    "textured": ("textured", "patterned"),
    "dark": ("dark", "dark grey"),
}
TEXTURES = ("stripes", "checks", "noise")

# Zero-shot prompt templates, worded like the training captions; {o} is " outline" for outlined
# shapes, {bg} the background's word.
_TEMPLATE_FORMS = ("a photo of a {c}{o}.", "a {c}{o}.", "a drawing of a {c}{o}.", "a {c}{o} on a {bg} background.")
#: The default domain's templates.
TEMPLATES: tuple[str, ...] = tuple(t.format(c="{c}", o="", bg="plain") for t in _TEMPLATE_FORMS)

# Caption phrasings; {a} is the main shape's noun phrase ("a large red circle"), {b} the
# second one's, {rel} where the main shape is relative to the second, {inv} the converse,
# {bg} and {tone} the background's two words.
_ONE_SHAPE = (
    "{a}",
    "a photo of {a}",
    "a drawing of {a}",
    "an image of {a} on a {bg} background",
    "{a} on a {tone} background",
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


def _heart(n: int = 32) -> list[tuple[float, float]]:
    """The classic parametric heart, lobes up and point down in image coordinates (y down), centred on its box."""
    pts = [
        (16 * math.sin(t) ** 3, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)))
        for t in (2 * math.pi * k / n for k in range(n))
    ]
    cx = (max(x for x, _ in pts) + min(x for x, _ in pts)) / 2
    cy = (max(y for _, y in pts) + min(y for _, y in pts)) / 2
    norm = max(math.hypot(x - cx, y - cy) for x, y in pts)
    return [((x - cx) / norm, (y - cy) / norm) for x, y in pts]


# Unit outlines (max vertex norm 1), so a shape of radius r stays inside its bounding circle.
_OUTLINES: dict[str, list[tuple[float, float]]] = {
    "square": [(math.cos(a), math.sin(a)) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))],
    "triangle": [(math.cos(a), math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))],
    "star": [
        (r * math.cos(a), r * math.sin(a))
        for k in range(10)
        for r, a in [(1.0 if k % 2 == 0 else 0.45, -math.pi / 2 + k * math.pi / 5)]
    ],
    "hexagon": [(math.cos(a), math.sin(a)) for a in (k * math.pi / 3 for k in range(6))],
    "heart": _heart(),
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
    # The domain: what is drawn and how. The defaults are the demo's domain.
    colors: list[str] = Field(default_factory=lambda: list(COLORS), description=f"the colours drawn, of: {', '.join(ALL_COLORS)}")
    shapes: list[str] = Field(default_factory=lambda: list(SHAPES), description=f"the shapes drawn, of: {', '.join(ALL_SHAPES)}")
    fill: Literal["filled", "outline"] = Field("filled", description="solid shapes, or only their outlines")
    background: Literal["plain", "textured", "dark"] = Field(
        "plain", description="plain light grey; a light pattern (stripes, checks or noise); plain dark grey"
    )
    scale: tuple[float, float] = Field(
        (1.0, 1.0), description="[low, high]: each image's shapes are drawn at a factor of their full size picked in this range"
    )
    rotation: float = Field(
        15.0, ge=0, le=180, description="shapes other than circles turn by up to this many degrees either way"
    )
    stroke: float = Field(0.15, ge=0.05, le=1.0, description="with fill: outline, the line's width as a fraction of the radius")

    @field_validator("colors", "shapes")
    @classmethod
    def _known_and_distinct(cls, names: list[str], info: ValidationInfo) -> list[str]:
        available = list(ALL_COLORS) if info.field_name == "colors" else list(ALL_SHAPES)
        what = "colour" if info.field_name == "colors" else "shape"
        if not names:
            raise ValueError(f"choose at least one {what} of: {', '.join(available)}")
        for name in names:
            if name not in available:
                raise ValueError(f"unknown {what} {name!r}; available: {', '.join(available)}")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"{', '.join(map(repr, twice))} given more than once: each {what} is one class name")
        return names

    @field_validator("scale")
    @classmethod
    def _a_range(cls, scale: tuple[float, float]) -> tuple[float, float]:
        low, high = scale
        if not 0.25 <= low <= high <= 1.0:
            raise ValueError(f"give [low, high] with 0.25 <= low <= high <= 1, not [{low}, {high}]")
        return scale

    def domain(self) -> dict[str, Any]:
        """The parameters that change what is drawn, beyond the seed and the image size."""
        fields = self.model_dump(mode="json", include=_DOMAIN_FIELDS)
        if self.fill == "filled":  # no line to draw: its width changes nothing
            del fields["stroke"]
        return fields


_DOMAIN_FIELDS = {"colors", "shapes", "fill", "background", "scale", "rotation", "stroke"}

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

    def phrase(self, with_size: bool, outline: bool) -> str:
        words = f"{self.size} {self.color} {self.shape}" if with_size else f"{self.color} {self.shape}"
        words += " outline" if outline else ""
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
        colors: list[str] | None = None,
        shapes: list[str] | None = None,
        fill: str = "filled",
        background: str = "plain",
        scale: tuple[float, float] = (1.0, 1.0),
        rotation: float = 15.0,
        stroke: float = 0.15,
    ) -> None:
        fields = dict(locals())
        del fields["self"]
        for name in ("colors", "shapes"):
            if fields[name] is None:
                del fields[name]
        # Validated here too, so that a dataset built in Python is refused as a recipe entry is.
        self.params = params = SyntheticShapesParams.model_validate(fields)
        self.size, self.seed, self.image_size, self.offset = size, seed, image_size, offset
        self.max_shapes, self.captions_per_image, self.defects = max_shapes, captions_per_image, defects
        self.colors, self.shapes, self.fill, self.background = params.colors, params.shapes, params.fill, params.background
        self.scale, self.rotation = params.scale, params.rotation
        self.stroke = params.stroke if params.fill == "outline" else 0.0
        # Another domain gets other keys and other random streams: its samples never pass for the
        # default domain's, and a mix of domains holds no pairs of twins drawn from one stream.
        domain = params.domain()
        self.domain_id = "" if domain == _DEFAULT_DOMAIN else _digest(domain)
        self.classes: list[str] = [f"{c} {s}" for c in self.colors for s in self.shapes]
        words = BACKGROUNDS[self.background]
        outline = " outline" if self.fill == "outline" else ""
        self.templates: list[str] = [t.format(c="{c}", o=outline, bg=words[0]) for t in _TEMPLATE_FORMS]

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[Sample]:
        return (self[i] for i in range(self.size))

    def parts(self, part_size: int = 2000) -> list[dict[str, Any]]:
        """Dataset entries of consecutive slices, for curation to process in parallel."""
        base = {"type": "synthetic-shapes", **self.params.model_dump(mode="json", exclude={"size", "offset"})}
        return [
            {**base, "offset": self.offset + start, "size": min(part_size, self.size - start)}
            for start in range(0, self.size, part_size)
        ]

    def _stream(self, i: int) -> str:
        return f"{self.domain_id}-{self.seed}-{i}" if self.domain_id else f"{self.seed}-{i}"

    def __getitem__(self, i: int) -> Sample:
        if not 0 <= i < self.size:
            raise IndexError(f"synthetic-shapes: index {i} out of range for size {self.size}")
        i += self.offset
        rng = random.Random(self._stream(i))  # per index: independent of iteration order
        shapes, relation = self._layout(rng)
        main = shapes[0]
        # Drawn at _SUPERSAMPLE times the size and box-filtered down: smooth edges keep small
        # rotated shapes recognisable at 32 px instead of turning them into jagged blobs.
        canvas, texture = self._canvas(rng)
        draw = ImageDraw.Draw(canvas)
        for s in shapes:
            _draw(draw, s, _jitter(rng, ALL_COLORS[s.color], 12), rng, self.rotation, self.stroke)
        image = canvas.resize((self.image_size,) * 2, Image.Resampling.BOX)
        phrasings = _captions(shapes, relation, self.fill == "outline", BACKGROUNDS[self.background])
        captions = rng.sample(phrasings, min(self.captions_per_image, len(phrasings)))
        meta: dict[str, Any] = {
            "shapes": [
                {"color": s.color, "shape": s.shape, "size": s.size, "x": s.x, "y": s.y, "radius": s.radius} for s in shapes
            ],
            "relation": relation,
        }
        if self.domain_id:  # the default domain's samples stay what they always were
            meta["style"] = {"fill": self.fill, "background": self.background, "texture": texture}
        prefix = f"shapes-{self.domain_id}" if self.domain_id else "shapes"
        sample = Sample(
            key=f"{prefix}-{self.seed}-{i:07d}",
            image=image,
            caption=captions[0] if self.captions_per_image == 1 else captions,
            label=self.classes.index(f"{main.color} {main.shape}"),
            meta=meta,
        )
        return self._spoil(sample, i) if self.defects else sample

    def _canvas(self, rng: random.Random) -> tuple[Image.Image, str | None]:
        """The supersampled background to draw on, and its texture's name (None: plain)."""
        side = (self.image_size * _SUPERSAMPLE,) * 2
        if self.background == "dark":
            return Image.new("RGB", side, _jitter(rng, (rng.randint(30, 60),) * 3, 6)), None
        background = _jitter(rng, (rng.randint(218, 250),) * 3, 6)  # light grey, slightly tinted
        if self.background == "plain":
            return Image.new("RGB", side, background), None
        texture = rng.choice(TEXTURES)
        return _texture(rng, texture, side[0], background), texture

    def _spoil(self, sample: Sample, i: int) -> Sample:
        # A separate generator: the clean samples stay what they are without defects.
        rng = random.Random(f"defects-{self._stream(i)}")
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
        color, shape = rng.choice(self.colors), rng.choice(self.shapes)
        # One factor for the image's shapes, so that the main one stays the larger.
        k = rng.uniform(*self.scale) if self.scale != (1.0, 1.0) else 1.0
        if self.max_shapes == 1 or rng.random() < 0.5:
            size = rng.choice(("large", "small"))
            r = extent * (rng.uniform(0.26, 0.38) if size == "large" else rng.uniform(0.15, 0.2)) * k
            x, y = rng.uniform(r, extent - r), rng.uniform(r, extent - r)
            return [_Shape(color, shape, size, round(x, 2), round(y, 2), round(r, 2))], None
        # Second shape: another colour and another kind (where the domain has another), so the
        # caption names two distinct objects.
        color2 = rng.choice([c for c in self.colors if c != color] or [color])
        shape2 = rng.choice([s for s in self.shapes if s != shape] or [shape])
        r1, r2 = extent * rng.uniform(0.2, 0.245) * k, extent * rng.uniform(0.12, 0.16) * k
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


_DEFAULT_DOMAIN = SyntheticShapesParams(size=1).domain()


def _digest(domain: dict[str, Any]) -> str:
    return clipforge.content_hash(domain, 8)


def _captions(shapes: list[_Shape], relation: str | None, outline: bool, background: tuple[str, str]) -> list[str]:
    """Every distinct phrasing of this image, in a fixed order."""
    bg, tone = background
    if relation is None:
        forms = [t.format(a=shapes[0].phrase(sized, outline), bg=bg, tone=tone) for t in _ONE_SHAPE for sized in (True, False)]
    else:
        forms = [
            t.format(
                a=shapes[0].phrase(sized, outline), b=shapes[1].phrase(sized, outline), rel=relation, inv=_CONVERSE[relation]
            )
            for t in _TWO_SHAPES
            for sized in (True, False)
        ]
    return list(dict.fromkeys(forms))


def _jitter(rng: random.Random, rgb: tuple[int, ...], amount: int) -> tuple[int, int, int]:
    r, g, b = (max(0, min(255, v + rng.randint(-amount, amount))) for v in rgb)
    return r, g, b


def _texture(rng: random.Random, kind: str, side: int, base: tuple[int, int, int]) -> Image.Image:
    """A light background of ``side`` pixels: ``base`` darkened by a pattern of stripes, checks or noise."""
    contrast = rng.randint(30, 50)  # visible at 32 px, yet far lighter than any shape's colour
    cells = rng.choice((4, 5, 6, 8))  # periods across the image
    v, u = np.mgrid[0:side, 0:side] * (cells / side)
    if kind == "stripes":
        turn = math.radians(rng.choice((0, 45, 90, 135)))
        shade = ((u * math.cos(turn) + v * math.sin(turn)) % 1 < 0.5).astype(float)
    elif kind == "checks":
        shade = ((np.floor(u) + np.floor(v)) % 2).astype(float)
    else:  # blotches: a coarse grid of random shades, two cells per period
        grid = np.random.default_rng(rng.getrandbits(64)).random((2 * cells, 2 * cells))
        index = np.arange(side) * (2 * cells) // side
        shade = grid[index[:, None], index[None, :]]
    pixels = np.asarray(base, dtype=float) - contrast * shade[..., None]
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")


def _draw(
    draw: ImageDraw.ImageDraw, s: _Shape, color: tuple[int, int, int], rng: random.Random, rotation: float, stroke: float
) -> None:
    """Draw ``s`` on the supersampled canvas: filled, or (``stroke`` > 0) its outline, that fraction of its radius wide."""
    x, y, r = (v * _SUPERSAMPLE for v in (s.x, s.y, s.radius))
    width = max(1, round(r * stroke)) if stroke else 0
    if s.shape == "circle":
        box = (x - r, y - r, x + r, y + r)
        if width:
            draw.ellipse(box, outline=color, width=width)
        else:
            draw.ellipse(box, fill=color)
        return
    turn = math.radians(rng.uniform(-rotation, rotation))  # by default a little: never a square made a diamond
    cos, sin = math.cos(turn), math.sin(turn)
    points = [(x + r * (u * cos - v * sin), y + r * (u * sin + v * cos)) for u, v in _OUTLINES[s.shape]]
    if width:
        draw.polygon(points, outline=color, width=width)
    else:
        draw.polygon(points, fill=color)


@clipforge.hookimpl
def register_datasets(register):
    register(
        "synthetic-shapes",
        SyntheticShapes,
        params=SyntheticShapesParams,
        description="coloured shapes with captions, generated from a seed; labels are colour x shape classes",
    )
