"""Phase 1, one task per part: decode, run the per-sample steps, stage the survivors and the features
the whole-dataset steps need. A part that finished (``done.json``) is not done again."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from pydantic import BaseModel

from clipforge.core.components import Sample, reads_pixels
from clipforge.core.errors import StageError
from clipforge.core.results import StepCounts
from clipforge.engine.curation.layout import (
    DECODE_STEP,
    MANIFEST_COLUMNS,
    PART_DONE,
    PART_MANIFEST,
    STAGED,
    features_of,
    part_dir,
    save_features,
    score_columns,
    write_parquet,
)
from clipforge.engine.curation.plan import Job, Steps, build_steps
from clipforge.engine.shards import BadSample, Decoded, ShardWriter, decode, load_pixels

BATCH = 256


class PartJob(Job):
    """Curate part ``index``, the dataset entry ``entry``."""

    entry: dict[str, Any]


class PartResult(BaseModel):
    """What a part saw and kept, step by step (``done.json``)."""

    index: int
    input: int
    kept: int
    funnel: dict[str, StepCounts]
    seconds: float


@dataclass
class Funnel:
    """What each step saw, kept and dropped (and why), in order."""

    steps: list[str]
    seen: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    reasons: dict[str, Counter[str]] = field(default_factory=dict)

    def drop(self, step: str, reason: str, n: int = 1) -> None:
        self.dropped[step] += n
        self.reasons.setdefault(step, Counter())[reason] += n

    def add(self, other: dict[str, StepCounts]) -> None:
        for step, counts in other.items():
            self.seen[step] += counts.seen
            for reason, n in counts.reasons.items():
                self.drop(step, reason, n)

    def counts(self) -> dict[str, StepCounts]:
        return {
            step: StepCounts(
                seen=self.seen[step],
                kept=self.seen[step] - self.dropped[step],
                dropped=self.dropped[step],
                reasons=dict(self.reasons.get(step, {})),
            )
            for step in self.steps
        }


Alive = list[tuple[Decoded, dict[str, float]]]


class _Part:
    """One part being curated: its funnel, its manifest rows, the features of the whole-dataset steps."""

    def __init__(self, steps: Steps) -> None:
        self.steps = steps
        self.funnel = Funnel([DECODE_STEP, *[label for label, _ in steps.local]])
        self.rows: dict[str, list[Any]] = {c: [] for c in MANIFEST_COLUMNS}
        self.scores: list[dict[str, float]] = []
        self.features: dict[str, list[Any]] = {label: [] for label, _ in steps.whole}
        self.seen_keys: set[str] = set()
        # Images are only opened until the first step that reads pixels (and always before staging),
        # so a sample that steps reading sizes and captions drop is never fully decoded.
        self.pixels_from = next((i for i, (_, s) in enumerate(steps.local) if reads_pixels(s)), len(steps.local))

    def record(self, key: str, kept: bool, step: str, reason: str, detail: str, scores: dict[str, float]) -> None:
        for column, value in zip(MANIFEST_COLUMNS, (key, kept, step, reason, detail)):
            self.rows[column].append(value)
        self.scores.append(scores)

    def admit(self, batch: list[Any]) -> Alive:
        """The batch's samples that decode (opened only, unless the first step reads pixels); the rest recorded."""
        alive: Alive = []
        self.funnel.seen[DECODE_STEP] += len(batch)
        for raw in batch:
            key = raw.key if isinstance(raw, Sample) and isinstance(raw.key, str) else repr(getattr(raw, "key", raw))[:200]
            try:
                if not isinstance(raw, Sample):
                    raise BadSample(f"not a Sample ({type(raw).__name__})")
                if key in self.seen_keys:
                    raise BadSample("duplicate key")
                item = decode(raw, pixels=self.pixels_from == 0)
            except BadSample as e:
                self.funnel.drop(DECODE_STEP, str(e))
                self.record(key, False, DECODE_STEP, str(e), source_of(raw), {})
                continue
            self.seen_keys.add(key)
            alive.append((item, {}))
        return alive

    def judge(self, alive: Alive, steps: list[tuple[str, Any]]) -> Alive:
        """The survivors of ``steps``, run in order; the others recorded with their step and reason."""
        for label, step in steps:
            if not alive:
                break
            self.funnel.seen[label] += len(alive)
            verdicts = list(step([item.sample for item, _ in alive]))
            if len(verdicts) != len(alive):
                raise StageError(f"curation step {label!r} returned {len(verdicts)} verdicts for {len(alive)} samples")
            survivors = []
            for (item, scores), verdict in zip(alive, verdicts):
                scores.update({f"{label}/{k}": float(v) for k, v in verdict.scores.items()})
                if verdict.keep:
                    survivors.append((item, scores))
                else:
                    self.funnel.drop(label, verdict.reason or "dropped")
                    detail = verdict.detail or source_of(item.sample)
                    self.record(item.sample.key, False, label, verdict.reason or "dropped", detail, scores)
            alive = survivors
        return alive

    def with_pixels(self, alive: Alive) -> Alive:
        """Decode the survivors' pixels; an image that fails counts as dropped at decode, as if decoded first."""
        out = []
        for item, scores in alive:
            try:
                out.append((load_pixels(item), scores))
            except BadSample as e:
                self.funnel.drop(DECODE_STEP, str(e))
                for label, _ in self.steps.local[: self.pixels_from]:
                    self.funnel.seen[label] -= 1
                self.record(item.sample.key, False, DECODE_STEP, str(e), source_of(item.sample), {})
        return out

    def survivors(self, batch: list[Any]) -> Alive:
        alive = self.with_pixels(self.judge(self.admit(batch), self.steps.local[: self.pixels_from]))
        alive = self.judge(alive, self.steps.local[self.pixels_from :])
        for label, step in self.steps.whole:
            if alive:
                self.features[label].extend(step.features([item.sample for item, _ in alive]))  # an array by rows
        return alive


def curate_part(job: PartJob) -> PartResult:
    """Decode part ``job.index`` and run the per-sample steps; stage the survivors and the whole-dataset steps' features."""
    recipe, catalog, store = job.open()
    folder = part_dir(job.out, job.index)
    if store.exists(f"{folder}/{PART_DONE}"):
        return PartResult.model_validate(store.read_json(f"{folder}/{PART_DONE}"))
    start = time.perf_counter()
    part = _Part(build_steps(recipe, catalog))
    # survivors stream to the staging shard as tar bytes: a part's decoded images are never all held at once
    with ShardWriter(store, f"{folder}/{STAGED}") as staged:
        for batch in _batches(catalog.create("datasets", job.entry), BATCH):
            for item, scores in part.survivors(batch):
                part.record(item.sample.key, True, "", "", source_of(item.sample), scores)
                staged.add(item)
        staged.close()
    for label, values in part.features.items():
        save_features(store, features_of(job.out, job.index, label), values)
    write_parquet(store, f"{folder}/{PART_MANIFEST}", {**part.rows, **score_columns(part.scores)})
    done = PartResult(
        index=job.index, input=len(part.rows["key"]), kept=staged.samples, funnel=part.funnel.counts(),
        seconds=round(time.perf_counter() - start, 3),
    )  # fmt: skip
    store.write_json(f"{folder}/{PART_DONE}", done.model_dump(mode="json"))  # last: marks the part complete
    return done


def source_of(sample: Any) -> str:
    """Where the dataset read a sample (``meta["source"]``: a shard and byte offset, a table's row): the
    manifest's detail, unless a step gives its own."""
    meta = getattr(sample, "meta", None)
    return str(meta.get("source") or "") if isinstance(meta, dict) else ""


def _batches(it: Iterable[Any], n: int) -> Iterator[list[Any]]:
    it = iter(it)
    while batch := list(islice(it, n)):
        yield batch
