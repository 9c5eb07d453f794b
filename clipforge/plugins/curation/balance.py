"""``balance``: MetaCLIP's balancing (Xu et al. 2023) of captions over metadata entries, in every language.

Matching follows MetaCLIP 2: entries and captions are normalised alike (:func:`normalise`: NFKC,
Unicode case folding, whitespace collapsed); every entry is looked for in every caption at once
by an Aho-Corasick automaton (``ahocorasick_rs``); an occurrence counts as a match when it stands
as whole words where the script separates words with spaces, and anywhere where it does not
(Chinese, Japanese, Thai...: :data:`NO_SPACE_SCRIPTS`). Each caption of a sample is matched on
its own. An entry matched by ``c`` pairs keeps each of them with probability ``min(1, t / c)``;
a pair is kept when any of its entries keeps it. Head entries are capped at about ``t`` pairs;
the tail is kept whole. Against a pool, the pool's pairs of an entry count towards its cap.

Whole words: the occurrence meets, on each side, the caption's start or end, whitespace, a
character of a script without spaces, or punctuation that opens or closes a phrase (brackets,
quotes, ``. , ; : ! ?``, emoji) with nothing else up to whitespace. ``c`` thus matches
``(c)`` and ``c, d`` but neither ``c++`` nor ``c#``; ``c++`` is an entry of its own.
"""

from __future__ import annotations

import functools
import hashlib
import unicodedata
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

import clipforge
from clipforge import Block, ConfigError, Pool, Sample, Verdict

#: Code point ranges of the scripts written without spaces between words: an entry of them matches as a substring.
NO_SPACE_SCRIPTS = (
    (0x0E00, 0x0EFF),  # Thai, Lao
    (0x0F00, 0x0FFF),  # Tibetan
    (0x1000, 0x109F),  # Myanmar
    (0x1780, 0x17FF),  # Khmer
    (0x2E80, 0x2FDF),  # CJK radicals
    (0x3005, 0x3007),  # ideographic iteration and closing marks, the ideographic zero
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x3100, 0x312F),  # Bopomofo
    (0x31F0, 0x31FF),  # Katakana extensions
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0x20000, 0x3FFFF),  # CJK extensions B and later
)
#: Punctuation that joins the characters around it into one word (``c#``, ``at&t``, ``50%``, ``l·l``).
JOINERS = "#&@%*/\\·"
WORD, SPACE, PUNCT, NO_SPACE = 0, 1, 2, 3
#: Bumped when matching changes: the pool's stored matches are only comparable under the same rules.
MATCHING = 1


def normalise(text: str) -> str:
    """NFKC and Unicode case folding (``Café`` -> ``café``, ``Straße`` -> ``strasse``, full-width
    Latin letters -> ASCII), whitespace runs to one space: entries and captions alike."""
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    return " ".join(folded.split())


@functools.lru_cache(maxsize=1)
def _classes() -> np.ndarray:
    """The class of every code point up to U+FFFF (the astral planes are classed in :func:`_classify`)."""
    table = np.zeros(0x10000, dtype=np.uint8)
    for cp in range(0x10000):
        ch = chr(cp)
        category = unicodedata.category(ch)
        if ch.isspace():
            table[cp] = SPACE
        elif category in ("Ps", "Pe", "Pi", "Pf", "Po", "So") and ch not in JOINERS:
            table[cp] = PUNCT
    for low, high in NO_SPACE_SCRIPTS:
        block = table[low : min(high, 0xFFFF) + 1]  # a view: letters and marks of these scripts, not their punctuation
        block[block == WORD] = NO_SPACE
    return table


def _classify(codes: np.ndarray) -> np.ndarray:
    out = _classes()[np.minimum(codes, 0xFFFF)]
    astral = codes > 0xFFFF
    out[astral] = np.where((codes[astral] >= 0x20000) & (codes[astral] <= 0x3FFFF), NO_SPACE,
                           np.where((codes[astral] >= 0x1F000) & (codes[astral] <= 0x1FAFF), PUNCT, WORD))  # fmt: skip
    return out


def word_bounds(text: str) -> tuple[np.ndarray, np.ndarray]:
    """For each position ``i`` of ``text`` (0 to len): whether a word may start there (``starts``) and
    whether one may end there (``ends``), as the module's docstring defines whole words."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    cls = _classify(codes)
    n = len(cls)
    positions = np.arange(n)
    solid = cls != PUNCT  # what a run of phrase punctuation is skipped to
    breaks = np.append((cls == SPACE) | (cls == NO_SPACE), True)  # index n: the text's end (and start, as -1)
    before = np.maximum.accumulate(np.where(solid, positions, -1))  # last solid character at or before i
    after = np.minimum.accumulate(np.where(solid, positions, n)[::-1])[::-1]  # first solid character at or after i
    starts = np.empty(n + 1, dtype=bool)
    starts[0] = True
    starts[1:] = breaks[before]  # before == -1 reads index -1: True, the start
    ends = np.empty(n + 1, dtype=bool)
    ends[:n] = breaks[after]
    ends[n] = True
    return starts, ends


class BalanceParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    entries: list[str] | None = Field(None, min_length=1, description="metadata entries: words and phrases, in any language")
    entries_file: str | None = Field(
        None, min_length=1, description="or a UTF-8 text file of entries, one per line: a local path or a store URI (s3://...)"
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for entries_file (endpoint_url, ...)"
    )
    t: int = Field(20_000, gt=0, description="matches kept per entry (MetaCLIP: 20,000 for 400 M pairs)")
    seed: int = 0
    keep_unmatched: bool = Field(False, description="MetaCLIP drops pairs that match no entry")

    @model_validator(mode="after")
    def _one_source(self) -> BalanceParams:
        if (self.entries is None) == (self.entries_file is None):
            raise ValueError("give exactly one of 'entries' (a list) and 'entries_file' (a file of one entry per line)")
        if self.entries is not None:
            check_entries(self.entries, "entries")
        return self

    def check_inputs(self) -> list[tuple[str, str]]:
        """The entries file exists, is UTF-8 text and holds entries (a small file: read whole)."""
        if self.entries_file is None:
            return []
        try:
            check_entries(read_entries(self.entries_file, self.storage_options), "entries_file")
        except (ConfigError, ValueError) as e:
            return [("entries_file", str(e))]
        return []


def check_entries(entries: list[str], where: str) -> list[str]:
    """The entries normalised; an entry that normalises to nothing is refused, with its position."""
    normalised = [normalise(e) for e in entries]
    empty = [i for i, e in enumerate(normalised) if not e]
    if empty:
        raise ValueError(f"{where}: entries with no text after normalisation at {', '.join(map(str, empty[:5]))}: "
                         f"{[entries[i] for i in empty[:5]]}")  # fmt: skip
    return normalised


def read_entries(path: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """The entries of a UTF-8 text file, one per line (blank lines skipped), or a clear error naming the file."""
    import fsspec

    try:
        with fsspec.open(path, "rb", **(storage_options or {})) as f:
            data = f.read()
    except FileNotFoundError:
        raise ConfigError(f"balance: entries_file {path!r} does not exist") from None
    except OSError as e:
        raise ConfigError(f"balance: cannot read entries_file {path!r}: {e}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(f"balance: entries_file {path!r} is not UTF-8 text (line {line}, byte {e.start}: {e.reason})") from None
    entries = [line for line in text.splitlines() if line.strip()]
    if not entries:
        raise ConfigError(f"balance: entries_file {path!r} holds no entries (one per line expected)")
    return entries


class Matcher:
    """Every entry found in captions at once: an Aho-Corasick automaton over the normalised entries,
    each occurrence kept if it stands as whole words (or in a script without spaces)."""

    def __init__(self, entries: list[str]) -> None:
        import ahocorasick_rs

        self.entries = list(dict.fromkeys(entries))  # normalised, each once
        self.automaton = ahocorasick_rs.AhoCorasick(self.entries, matchkind=ahocorasick_rs.MatchKind.Standard)
        firsts = _classify(np.array([ord(e[0]) for e in self.entries], dtype=np.uint32))
        lasts = _classify(np.array([ord(e[-1]) for e in self.entries], dtype=np.uint32))
        self.free_start, self.free_end = firsts == NO_SPACE, lasts == NO_SPACE

    def __call__(self, captions: Sequence[Sequence[str]]) -> list[list[int]]:
        """For each sample (its captions), the indices of the entries any one of its captions matches, sorted."""
        texts = [normalise(c) for caps in captions for c in caps]
        owner = np.repeat(np.arange(len(captions)), [len(caps) for caps in captions])
        if not texts:
            return [[] for _ in captions]
        haystack = "\n".join(texts)  # captions apart: no entry holds a line break, so no match spans two
        found = np.array(self.automaton.find_matches_as_indexes(haystack, overlapping=True), dtype=np.int64).reshape(-1, 3)
        entry, start, end = found.T
        starts, ends = word_bounds(haystack)
        whole = (self.free_start[entry] | starts[start]) & (self.free_end[entry] | ends[end])
        caption_starts = np.cumsum([0] + [len(t) + 1 for t in texts[:-1]])
        sample = owner[np.searchsorted(caption_starts, start[whole], side="right") - 1]
        out: list[set[int]] = [set() for _ in captions]
        for s, e in zip(sample.tolist(), entry[whole].tolist()):
            out[s].add(e)
        return [sorted(m) for m in out]


class Balance:
    """MetaCLIP's balancing; in partitions, a count pass over every block, then each block's own draws
    (a function of the seed, the pair's key and the entry alone: :func:`_uniform`)."""

    def __init__(self, entries: list[str] | None = None, t: int = 20_000, seed: int = 0, keep_unmatched: bool = False,
                 entries_file: str | None = None, storage_options: dict[str, Any] | None = None):  # fmt: skip
        if entries is None:
            if entries_file is None:
                raise ConfigError("balance: give 'entries' or 'entries_file'")
            entries = read_entries(entries_file, storage_options)
        try:
            normalised = check_entries(entries, entries_file or "entries")
        except ValueError as e:
            raise ConfigError(f"balance: {e}") from None
        self.t, self.seed, self.keep_unmatched = t, seed, keep_unmatched
        self.matcher = Matcher(normalised)
        self.entries = self.matcher.entries
        digest = hashlib.sha256("\n".join(self.entries).encode()).hexdigest()
        self.signature = {"entries": digest, "matching": MATCHING}

    def matches(self, caption: str | list[str]) -> list[int]:
        """The entries one caption (or one sample's list of captions) matches."""
        return self.matcher([[caption] if isinstance(caption, str) else caption])[0]

    def features(self, samples: Sequence[Sample]) -> list[list[int]]:
        return self.matcher([s.captions for s in samples])

    def features_signature(self) -> dict[str, Any]:
        return self.signature

    def decide(self, keys: list[str], matches: list[list[int]]) -> list[Verdict]:
        return self._decide(keys, matches, np.zeros(len(self.entries), dtype=np.int64))

    def decide_against(self, keys: list[str], matches: list[list[int]], pool: Pool) -> list[Verdict]:
        """The pool's kept pairs of an entry fill its cap first: the new ones share what is left of ``t``."""
        held = np.zeros(len(self.entries), dtype=np.int64)
        if pool.statistics:
            flat = [e for m, kept in zip(pool.features, pool.kept) if kept for e in m]
            held += np.bincount(np.asarray(flat, dtype=np.int64), minlength=len(self.entries))
        return self._decide(keys, matches, held)

    # -- in partitions (clipforge.DecidesInPartitions): a count pass, then each block samples alone --------

    def survey(self, plan: Any, block: Block) -> tuple[str, np.ndarray]:
        """The block's matches per entry: the new data's, or a pool's kept pairs' (when they count)."""
        if block.pool and not block.statistics:
            return "held", np.zeros(len(self.entries), dtype=np.int64)
        rows = block.features if block.kept is None else [m for m, kept in zip(block.features, block.kept) if kept]
        flat = np.fromiter((e for m in rows for e in m), dtype=np.int64)
        return ("held" if block.pool else "new"), np.bincount(flat, minlength=len(self.entries))

    def plan(self, plan: Any, surveys: list[Any], partitions: int) -> tuple[Any, bool]:
        held = np.zeros(len(self.entries), dtype=np.int64)
        new = np.zeros(len(self.entries), dtype=np.int64)
        for kind, counts in surveys:
            (held if kind == "held" else new)[:] += counts
        return {"held": held, "total": held + new}, True

    def route(self, plan: Any, block: Block) -> dict[int, dict[str, Any]]:
        return {}

    def link(self, plan: Any, shares: list[dict[str, Any]]) -> None:
        return None

    def settle(self, plan: Any, links: list[Any], name: Any) -> Any:
        return plan

    def decide_block(self, plan: Any, block: Block) -> list[Verdict]:
        return self._decide(block.keys, block.features, plan["held"], plan["total"])

    def _decide(
        self, keys: list[str], matches: list[list[int]], held: np.ndarray, total: np.ndarray | None = None
    ) -> list[Verdict]:
        """Each (pair, entry) is kept with probability ``(t - held) / count``; a pair is kept if any of its entries keeps it.

        ``total``: each entry's pairs, the pool's and the new ones (by default counted in ``matches``).
        """
        sizes = np.array([len(m) for m in matches], dtype=np.int64)
        entry = np.fromiter((e for m in matches for e in m), dtype=np.int64, count=int(sizes.sum()))
        owner = np.repeat(np.arange(len(matches)), sizes)
        if total is None:
            total = held + np.bincount(entry, minlength=len(self.entries))  # the pool's and the new pairs of each entry
        chance = (self.t - held[entry]) / (total - held)[entry]
        kept = np.zeros(len(matches), dtype=bool)
        np.logical_or.at(kept, owner, _uniform(self.seed, keys, owner, entry) < chance)
        head = np.zeros(len(matches), dtype=np.int64)
        np.maximum.at(head, owner, total[entry])
        out = []
        for i, entries in enumerate(matches):
            if not entries:
                out.append(Verdict.kept(entries=0.0) if self.keep_unmatched else Verdict.dropped("matches no entry", entries=0.0))
            elif kept[i]:
                out.append(Verdict.kept(entries=float(len(entries)), head_count=float(head[i])))
            else:
                biggest = self.entries[max(entries, key=lambda e: total[e])]
                out.append(Verdict.dropped("entry over its cap", detail=biggest, head_count=float(head[i])))
        return out


def _uniform(seed: int, keys: list[str], owner: np.ndarray, entry: np.ndarray) -> np.ndarray:
    """A uniform draw in [0, 1) for each (pair, entry), a function of the seed, the pair's key and the entry
    alone: the same data and seed give the same subset, in any order and over any split into parts."""
    digests = b"".join(hashlib.blake2b(f"{seed}-{k}".encode(), digest_size=8).digest() for k in keys)
    x = np.frombuffer(digests, dtype=np.uint64)[owner] ^ (entry.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    # splitmix64's finaliser mixes the entry into every bit
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


@clipforge.hookimpl
def register_curation_steps(register):
    register("balance", Balance, params=BalanceParams)
