"""The recipe fields of each component: clipforge validates a recipe entry against these before a run."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class DclParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weighted: bool = Field(False, description="DCLW: weight positives by how hard they are (von Mises-Fisher weights)")
    sigma: float = Field(0.5, gt=0, description="DCLW's temperature of the positive weights")


class PairCosineParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batch_size: int = Field(256, gt=0, description="images or captions per forward pass")


class DigitsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    split: Literal["train", "test", "all"] = Field("all", description="test: every 5th digit; train: the others")
    image_size: int = Field(32, ge=8, description="side of the square images, in pixels (from 8x8 scans)")
    blank: float = Field(0.0, ge=0.0, le=1.0, description="fraction of digits replaced by blank scans, for curation to catch")
    seed: int = Field(0, description="which captions and which blank scans; same seed, same samples")


class ContrastParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_std: float = Field(0.05, ge=0.0, le=0.5, description="lowest standard deviation of the grey levels (0..1) kept")
