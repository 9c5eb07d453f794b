"""``image-size``: DataComp's image filter: smaller side at least ``min_side``, aspect ratio at most ``max_aspect``."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

import clipforge
from clipforge import Sample, Verdict


class ImageSizeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_side: int = Field(0, ge=0, description="smallest allowed shorter side, in pixels (DataComp: 200)")
    max_aspect: float | None = Field(None, ge=1.0, description="largest allowed long/short side ratio (DataComp: 3)")


class ImageSize:
    """Reads the size from the image header: curation need not decode the images it drops."""

    reads_pixels = False

    def __init__(self, min_side: int = 0, max_aspect: float | None = None):
        self.min_side, self.max_aspect = min_side, max_aspect

    def __call__(self, samples: Sequence[Sample]) -> list[Verdict]:
        out = []
        for s in samples:
            w, h = s.image.size
            short, long = min(w, h), max(w, h)
            aspect = long / short if short else float("inf")
            scores = {"short_side": float(short), "aspect": aspect}
            if short < self.min_side:
                out.append(Verdict(False, f"image too small ({short} < {self.min_side} px)", scores))
            elif self.max_aspect is not None and aspect > self.max_aspect:
                out.append(Verdict(False, f"aspect ratio too large ({aspect:.1f} > {self.max_aspect})", scores))
            else:
                out.append(Verdict.kept(**scores))
        return out


@clipforge.hookimpl
def register_curation_steps(register):
    register("image-size", ImageSize, params=ImageSizeParams)
