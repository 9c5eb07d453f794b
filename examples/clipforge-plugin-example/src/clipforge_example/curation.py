"""``example-contrast``: drop near-uniform images (blank scans, solid placeholders, failed renders).

The score is the standard deviation of the image's grey levels on a 0..1 scale: 0 for a blank
page, about 0.4 for a handwritten digit. Reasons read ``low contrast (std 0.003 < 0.05)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from clipforge import Sample, Verdict


class ContrastFilter:
    """Keeps images whose grey levels spread at least ``min_std``."""

    def __init__(self, min_std: float = 0.05) -> None:
        self.min_std = min_std

    def __call__(self, samples: Sequence[Sample]) -> list[Verdict]:
        verdicts = []
        for s in samples:
            std = float(np.asarray(s.image.convert("L"), dtype=np.float32).std() / 255)
            if std < self.min_std:
                verdicts.append(Verdict.dropped(f"low contrast (std {std:.3f} < {self.min_std})", std=std))
            else:
                verdicts.append(Verdict.kept(std=std))
        return verdicts
