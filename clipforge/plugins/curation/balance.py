"""``balance``: MetaCLIP's balancing (Xu et al. 2023) of captions over a list of metadata entries.

A caption matches an entry when the entry occurs in it as whole words. An entry matched by
``c`` pairs keeps each of them with probability ``min(1, t / c)``; a pair is kept when any of
its entries keeps it. Head entries are capped at about ``t`` pairs; the tail is kept whole.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

import clipforge
from clipforge.core.components import Sample, Verdict

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


class BalanceParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    entries: list[str] = Field(min_length=1, description="metadata entries: words and phrases")
    t: int = Field(20_000, gt=0, description="matches kept per entry (MetaCLIP: 20,000 for 400 M pairs)")
    seed: int = 0
    keep_unmatched: bool = Field(False, description="MetaCLIP drops pairs that match no entry")

    @field_validator("entries")
    @classmethod
    def _no_empty(cls, entries: list[str]) -> list[str]:
        bad = [e for e in entries if not _WORD.findall(e.lower())]
        if bad:
            raise ValueError(f"entries without a word: {bad[:5]}")
        return entries


class Balance:
    def __init__(self, entries: list[str], t: int = 20_000, seed: int = 0, keep_unmatched: bool = False):
        self.t, self.seed, self.keep_unmatched = t, seed, keep_unmatched
        self.entries = [" ".join(_WORD.findall(e.lower())) for e in entries]
        self.index = {e: i for i, e in enumerate(self.entries)}
        self.longest = max(len(e.split()) for e in self.entries)

    def matches(self, caption: str) -> list[int]:
        """Entries occurring in the caption as whole words: every n-gram up to the longest entry, looked up."""
        words = _WORD.findall(caption.lower())
        found = set()
        for n in range(1, self.longest + 1):
            for i in range(len(words) - n + 1):
                hit = self.index.get(" ".join(words[i : i + n]))
                if hit is not None:
                    found.add(hit)
        return sorted(found)

    def features(self, samples: Sequence[Sample]) -> list[list[int]]:
        return [self.matches(" ".join(s.captions)) for s in samples]

    def decide(self, keys: list[str], matches: list[list[int]]) -> list[Verdict]:
        counts = Counter(e for m in matches for e in m)
        out = []
        for key, entries in zip(keys, matches):
            if not entries:
                out.append(Verdict.kept(entries=0.0) if self.keep_unmatched else Verdict.dropped("matches no entry", entries=0.0))
                continue
            # seeded per pair and entry: the same data and seed give the same subset, in any order
            kept = any(random.Random(f"{self.seed}-{key}-{e}").random() < self.t / counts[e] for e in entries)
            head = max(counts[e] for e in entries)
            out.append(
                Verdict.kept(entries=float(len(entries)), head_count=float(head))
                if kept
                else Verdict.dropped(
                    "entry over its cap", detail=self.entries[max(entries, key=counts.__getitem__)], head_count=float(head)
                )
            )
        return out


@clipforge.hookimpl
def register_curation_steps(register):
    register("balance", Balance, params=BalanceParams)
