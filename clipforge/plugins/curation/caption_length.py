"""``caption-length``: drop pairs whose caption has too few or too many words or characters.

Words are whitespace-separated tokens; characters are counted on the stripped caption. An
image with several captions is kept if any one of them passes (the others can still be used
for training); if none passes, the verdict carries the first caption's reason.

Drop reasons read ``"<category> (<details>)"``; the category before `` (`` is stable, so a
report can group by it: ``too few words``, ``too many words``, ``too short``, ``too long``,
``empty caption``, ``missing caption``, ``caption is not text``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

import clipforge
from clipforge import Sample, Verdict


class CaptionLengthParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_words: int = Field(1, ge=0, description="fewest whitespace-separated words a caption may have")
    max_words: int | None = Field(None, ge=0, description="most words a caption may have; None: no limit")
    min_chars: int = Field(0, ge=0, description="fewest characters (after stripping) a caption may have")
    max_chars: int | None = Field(None, ge=0, description="most characters a caption may have; None: no limit")

    @field_validator("max_words", "max_chars")
    @classmethod
    def _not_below_min(cls, value: int | None, info: ValidationInfo) -> int | None:
        low_name = "min_" + str(info.field_name).removeprefix("max_")
        low = info.data.get(low_name)
        if value is not None and low is not None and value < low:
            raise ValueError(f"{info.field_name} ({value}) must be >= {low_name} ({low})")
        return value


class CaptionLength:
    """Keeps captions whose word and character counts lie within bounds."""

    reads_pixels = False  # captions only: curation need not decode the images it drops

    def __init__(
        self,
        min_words: int = 1,
        max_words: int | None = None,
        min_chars: int = 0,
        max_chars: int | None = None,
    ) -> None:
        self.min_words, self.max_words = min_words, max_words
        self.min_chars, self.max_chars = min_chars, max_chars

    def __call__(self, samples: Sequence[Sample]) -> list[Verdict]:
        return [self.judge(getattr(s, "caption", None)) for s in samples]

    def judge(self, caption: Any) -> Verdict:
        """The verdict on one caption, or on a list of captions (kept if any passes)."""
        if isinstance(caption, (list, tuple)):
            if not caption:
                return Verdict.dropped("missing caption (empty list)")
            verdicts = [self._judge_one(c) for c in caption]
            return next((v for v in verdicts if v.keep), verdicts[0])
        return self._judge_one(caption)

    def _judge_one(self, caption: Any) -> Verdict:
        if caption is None:
            return Verdict.dropped("missing caption")
        if not isinstance(caption, str):
            return Verdict.dropped(f"caption is not text ({type(caption).__name__})")
        text = caption.strip()
        if not text:
            return Verdict.dropped("empty caption", words=0.0, chars=0.0)
        words, chars = len(text.split()), len(text)
        scores = {"words": float(words), "chars": float(chars)}
        if words < self.min_words:
            return Verdict(False, f"too few words ({words} < {self.min_words})", scores)
        if self.max_words is not None and words > self.max_words:
            return Verdict(False, f"too many words ({words} > {self.max_words})", scores)
        if chars < self.min_chars:
            return Verdict(False, f"too short ({chars} < {self.min_chars} chars)", scores)
        if self.max_chars is not None and chars > self.max_chars:
            return Verdict(False, f"too long ({chars} > {self.max_chars} chars)", scores)
        return Verdict.kept(**scores)


@clipforge.hookimpl
def register_curation_steps(register):
    register(
        "caption-length",
        CaptionLength,
        params=CaptionLengthParams,
        description="drop captions with too few or too many words or characters",
    )
