"""Curation: the recipe's steps over a dataset, in parts that run in parallel, with a verdict for every sample.

Three phases, each resumable from what it left on the store:

1. **parts** (parallel): each part of the dataset is decoded and passed through the per-sample
   steps; what survives is staged as a tar shard, with the features the whole-dataset steps need.
2. **reduce** (once): the whole-dataset steps (deduplication, balancing, top fractions) decide
   over every surviving sample, from the features alone.
3. **finalize** (parallel): each part's survivors are resized to the model's input size and
   written as the curated shards; one Parquet manifest holds every input key and its verdict.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import numpy as np

from clipforge.core.catalog import Catalog
from clipforge.core.components import Sample
from clipforge.core.errors import ConfigError, StageError
from clipforge.core.recipe import Recipe
from clipforge.core.storage import Store
from clipforge.engine.shards import BadSample, Decoded, ShardWriter, decode, iter_shard, load_pixels

FORMAT_VERSION = 2
DECODE_STEP = "decode"
BATCH = 256


def curation_key(recipe: Recipe) -> str:
    """Curated data depends only on the training data, the steps and the image size: one folder per such set."""
    spec = {
        "v": FORMAT_VERSION,
        "data": recipe.data.train.entry(),
        "steps": [s.entry() for s in recipe.curation],
        "size": input_size(recipe),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def input_size(recipe: Recipe) -> int | None:
    """The model's input side in pixels, when the encoder entry says it (an open_clip config or arch name)."""
    fields = recipe.model.fields
    cfg = fields.get("config")
    if cfg is None and isinstance(fields.get("arch"), str):
        import open_clip

        cfg = open_clip.get_model_config(fields["arch"])
    size = (cfg or {}).get("vision_cfg", {}).get("image_size")
    return size if isinstance(size, int) else (max(size) if isinstance(size, (list, tuple)) else None)


def is_global(step: Any) -> bool:
    """A step that decides over the whole dataset: ``features(samples)`` per part, ``decide(keys, features)`` once."""
    return hasattr(step, "features") and hasattr(step, "decide")


def reads_pixels(step: Any) -> bool:
    """Whether a per-sample step looks at pixels; steps that read only captions and sizes say ``reads_pixels = False``."""
    return bool(getattr(step, "reads_pixels", True))


def step_labels(recipe: Recipe) -> list[str]:
    labels = [s.type for s in recipe.curation]
    if len(set(labels)) != len(labels):  # two steps of one type: number them so counts stay apart
        labels = [f"{i}-{name}" for i, name in enumerate(labels)]
    return labels


def build_steps(recipe: Recipe, catalog: Catalog) -> list[tuple[str, Any]]:
    steps = [(label, catalog.create("curation_steps", s.entry())) for label, s in zip(step_labels(recipe), recipe.curation)]
    seen_global = None
    for i, (label, step) in enumerate(steps):
        if is_global(step):
            seen_global = seen_global or (i, label)
        elif seen_global:
            raise ConfigError(
                f"curation.{i} ({label}) decides sample by sample and must come before "
                f"curation.{seen_global[0]} ({seen_global[1]}), which decides over the whole dataset"
            )
    return steps


def parts_of(recipe: Recipe, catalog: Catalog) -> list[dict[str, Any]]:
    """The dataset entries of the parts that run in parallel (the whole dataset where it cannot split)."""
    entry = recipe.data.train.entry()
    dataset = catalog.create("datasets", entry)
    return dataset.parts() if hasattr(dataset, "parts") else [entry]


@dataclass
class Funnel:
    """What each step saw, kept and dropped (and why), in order."""

    steps: list[str]
    seen: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    reasons: dict[str, Counter] = field(default_factory=dict)

    def drop(self, step: str, reason: str, n: int = 1) -> None:
        self.dropped[step] += n
        self.reasons.setdefault(step, Counter())[reason] += n

    def add(self, other: dict[str, dict[str, Any]]) -> None:
        for step, v in other.items():
            self.seen[step] += v["seen"]
            for reason, n in v["reasons"].items():
                self.drop(step, reason, n)

    def as_dict(self) -> dict[str, Any]:
        return {
            step: {
                "seen": self.seen[step],
                "kept": self.seen[step] - self.dropped[step],
                "dropped": self.dropped[step],
                "reasons": dict(self.reasons.get(step, {})),
            }
            for step in self.steps
        }


def _batches(it: Iterable[Any], n: int) -> Iterator[list[Any]]:
    it = iter(it)
    while batch := list(islice(it, n)):
        yield batch


def _part_dir(out: str, index: int) -> str:
    return f"{out}/parts/part-{index:06d}"


_MANIFEST_COLUMNS = ("key", "kept", "step", "reason", "detail", "scores")


# -- phase 1: parts -------------------------------------------------------------------------


def curate_part(recipe: Recipe, catalog: Catalog, store: Store, out: str, index: int, entry: dict[str, Any]) -> dict[str, Any]:
    """Decode one part and run the per-sample steps; stage the survivors and the whole-dataset steps' features."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = _part_dir(out, index)
    if store.exists(f"{folder}/done.json"):
        return store.read_json(f"{folder}/done.json")
    steps = build_steps(recipe, catalog)
    local = [(label, s) for label, s in steps if not is_global(s)]
    global_steps = [(label, s) for label, s in steps if is_global(s)]
    funnel = Funnel([DECODE_STEP, *[label for label, _ in local]])
    rows: dict[str, list[Any]] = {c: [] for c in _MANIFEST_COLUMNS}
    features: dict[str, list[Any]] = {label: [] for label, _ in global_steps}
    seen_keys: set[str] = set()
    start = time.perf_counter()

    columns = [rows[c].append for c in _MANIFEST_COLUMNS]
    # Images are only opened until the first step that reads pixels (and always before staging), so
    # a sample that steps reading sizes and captions drop is never fully decoded.
    pixels_from = next((i for i, (_, s) in enumerate(local) if reads_pixels(s)), len(local))

    def record(key: str, kept: bool, step: str, reason: str, detail: str, scores: dict[str, float]) -> None:
        for append, value in zip(columns, (key, kept, step, reason, detail, json.dumps(scores) if scores else "")):
            append(value)

    def judge(alive: list[tuple[Decoded, dict[str, float]]], steps: list[tuple[str, Any]]) -> list[tuple[Decoded, dict[str, float]]]:
        """The survivors of ``steps``, run in order; the others recorded with their step and reason."""
        for label, step in steps:
            if not alive:
                break
            funnel.seen[label] += len(alive)
            verdicts = list(step([item.sample for item, _ in alive]))
            if len(verdicts) != len(alive):
                raise StageError(f"curation step {label!r} returned {len(verdicts)} verdicts for {len(alive)} samples")
            survivors = []
            for (item, scores), verdict in zip(alive, verdicts):
                for k, v in verdict.scores.items():
                    scores[f"{label}/{k}"] = float(v)
                if verdict.keep:
                    survivors.append((item, scores))
                else:
                    funnel.drop(label, verdict.reason or "dropped")
                    record(item.sample.key, False, label, verdict.reason or "dropped", verdict.detail, scores)
            alive = survivors
        return alive

    def with_pixels(alive: list[tuple[Decoded, dict[str, float]]]) -> list[tuple[Decoded, dict[str, float]]]:
        """Decode the survivors' pixels; an image that fails counts as dropped at decode, as if decoded first."""
        out = []
        for item, scores in alive:
            try:
                out.append((load_pixels(item), scores))
            except BadSample as e:
                funnel.drop(DECODE_STEP, str(e))
                for label, _ in local[:pixels_from]:
                    funnel.seen[label] -= 1
                record(item.sample.key, False, DECODE_STEP, str(e), "", {})
        return out

    # survivors stream to the staging shard as tar bytes: a part's decoded images are never all held at once
    with ShardWriter(store, f"{folder}/staged.tar") as staged:
        for batch in _batches(catalog.create("datasets", entry), BATCH):
            alive: list[tuple[Decoded, dict[str, float]]] = []
            funnel.seen[DECODE_STEP] += len(batch)
            for raw in batch:
                key = raw.key if isinstance(raw, Sample) and isinstance(raw.key, str) else repr(getattr(raw, "key", raw))[:200]
                try:
                    if not isinstance(raw, Sample):
                        raise BadSample(f"not a Sample ({type(raw).__name__})")
                    if key in seen_keys:
                        raise BadSample("duplicate key")
                    item = decode(raw, pixels=pixels_from == 0)
                except BadSample as e:
                    funnel.drop(DECODE_STEP, str(e))
                    record(key, False, DECODE_STEP, str(e), "", {})
                    continue
                seen_keys.add(key)
                alive.append((item, {}))
            alive = with_pixels(judge(alive, local[:pixels_from]))
            alive = judge(alive, local[pixels_from:])
            for label, step in global_steps:
                if alive:
                    features[label].extend(_as_list(step.features([item.sample for item, _ in alive])))
            for item, scores in alive:
                record(item.sample.key, True, "", "", "", scores)
                staged.add(item)
        staged.close()

    for label, values in features.items():
        _save_features(store, f"{folder}/features-{label}", values)
    buf = io.BytesIO()
    pq.write_table(pa.table(rows), buf)
    store.write_bytes(f"{folder}/manifest.parquet", buf.getvalue())
    done = {
        "index": index,
        "input": len(rows["key"]),
        "kept": staged.samples,
        "funnel": funnel.as_dict(),
        "seconds": round(time.perf_counter() - start, 3),
    }
    store.write_json(f"{folder}/done.json", done)  # last: marks the part complete
    return done


def _as_list(values: Any) -> list[Any]:
    return list(values) if not isinstance(values, np.ndarray) else [row for row in values]


def _save_features(store: Store, rel: str, values: list[Any]) -> None:
    """Arrays as a float16 .npy (compact, no pickle), anything else as JSON."""
    if values and isinstance(values[0], np.ndarray):
        buf = io.BytesIO()
        np.save(buf, np.stack(values).astype(np.float16), allow_pickle=False)
        store.write_bytes(f"{rel}.npy", buf.getvalue())
    else:
        store.write_json(f"{rel}.json", values)


def _load_features(store: Store, rel: str) -> Any:
    if store.exists(f"{rel}.npy"):
        return np.load(io.BytesIO(store.read_bytes(f"{rel}.npy")), allow_pickle=False)
    return store.read_json(f"{rel}.json") if store.exists(f"{rel}.json") else []


# -- phase 2: reduce ------------------------------------------------------------------------


def reduce(recipe: Recipe, catalog: Catalog, store: Store, out: str, n_parts: int) -> dict[str, Any]:
    """The whole-dataset steps over every part's survivors; returns the drops as ``{part: {key: verdict}}``."""
    import pyarrow.parquet as pq

    if store.exists(f"{out}/reduce.json"):
        return store.read_json(f"{out}/reduce.json")
    global_steps = [(label, s) for label, s in build_steps(recipe, catalog) if is_global(s)]
    keys: list[str] = []
    owner: list[int] = []
    for i in range(n_parts):
        table = pq.read_table(store.open(f"{_part_dir(out, i)}/manifest.parquet"), columns=["key", "kept"])
        part_keys = [k for k, kept in zip(table.column("key").to_pylist(), table.column("kept").to_pylist()) if kept]
        keys += part_keys
        owner += [i] * len(part_keys)
    drops: dict[str, dict[str, Any]] = {}
    seen: set[str] = set()
    alive = np.ones(len(keys), dtype=bool)
    for j, key in enumerate(keys):  # one key in two parts: the later one goes
        if key in seen:
            alive[j] = False
            drops[str(j)] = {"step": DECODE_STEP, "reason": "duplicate key", "detail": "", "scores": {}}
        seen.add(key)
    del seen
    funnel: dict[str, dict[str, Any]] = {}
    for label, step in global_steps:
        feats: list[Any] = []
        for i in range(n_parts):
            values = _load_features(store, f"{_part_dir(out, i)}/features-{label}")
            feats.extend(values if not isinstance(values, np.ndarray) else list(values))
        index = np.flatnonzero(alive)
        chosen = [feats[j] for j in index]
        if chosen and isinstance(chosen[0], np.ndarray):
            chosen = np.stack(chosen).astype(np.float32)
        verdicts = list(step.decide([keys[j] for j in index], chosen))
        reasons: Counter = Counter()
        for j, verdict in zip(index, verdicts):
            if not verdict.keep:
                alive[j] = False
                reasons[verdict.reason or "dropped"] += 1
                drops[str(j)] = {"step": label, "reason": verdict.reason or "dropped", "detail": verdict.detail, "scores": verdict.scores}
        funnel[label] = {"seen": len(index), "kept": len(index) - sum(reasons.values()), "dropped": sum(reasons.values()), "reasons": dict(reasons)}
    by_part: dict[str, dict[str, Any]] = {}
    for j, verdict in drops.items():
        by_part.setdefault(str(owner[int(j)]), {})[keys[int(j)] + f"#{j}"] = verdict
    result = {"drops": by_part, "funnel": funnel, "kept": int(alive.sum())}
    store.write_json(f"{out}/reduce.json", result)
    return result


# -- phase 3: finalize ----------------------------------------------------------------------


def finalize_part(store: Store, out: str, index: int, first: int, drops: dict[str, Any], size: int | None,
                  shard_size: int) -> list[dict[str, Any]]:  # fmt: skip
    """Write a part's final shards: its staged survivors less the whole-dataset drops, resized to ``size``.

    ``first`` is the position of the part's first survivor in the reduce phase's global order.
    """
    folder = _part_dir(out, index)
    if store.exists(f"{folder}/final.json"):
        return store.read_json(f"{folder}/final.json")
    dropped_positions = {int(k.rsplit("#", 1)[1]) for k in drops}
    shards: list[dict[str, Any]] = []
    writer: ShardWriter | None = None
    try:
        for position, raw in enumerate(iter_shard(store, f"{folder}/staged.tar"), start=first):
            if position in dropped_positions:
                continue
            if writer is None:
                writer = ShardWriter(store, f"{out}/shard-{index:06d}-{len(shards):03d}.tar")
            item = decode(Sample(raw["key"], raw["image"], raw["caption"], raw["label"], raw["meta"]))
            writer.add(_resized(item, size) if size else item)
            if writer.samples >= shard_size:
                shards.append(writer.close())
                writer = None
        if writer is not None:
            shards.append(writer.close())
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    store.write_json(f"{folder}/final.json", shards)
    return shards


def first_positions(parts: list[dict[str, Any]]) -> list[int]:
    """Where each part's survivors start in the reduce phase's global order."""
    return [int(x) for x in np.cumsum([0] + [p["kept"] for p in parts[:-1]])]


def _resized(item: Decoded, size: int) -> Decoded:
    """Shorter side down to ``size`` (never up), re-encoded in the image's own format."""
    from PIL import Image

    image = item.sample.image
    short = min(image.size)
    if short <= size:
        return item
    scale = size / short
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    fmt = {"jpg": "JPEG", "webp": "WEBP"}.get(item.ext, "PNG")
    image.save(buf, format=fmt, **({"quality": 95} if fmt != "PNG" else {}))
    item.sample.image = image
    return Decoded(item.sample, buf.getvalue(), item.ext)


def assemble(recipe: Recipe, store: Store, out: str, parts: list[dict[str, Any]], reduced: dict[str, Any],
             shards: list[list[dict[str, Any]]], seconds: float) -> dict[str, Any]:  # fmt: skip
    """One manifest and summary from the parts, the reduce and the final shards (row group by row group)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    funnel = Funnel([DECODE_STEP, *step_labels(recipe)])
    for done in parts:
        funnel.add(done["funnel"])
    funnel.add(reduced["funnel"])
    duplicate_keys = sum(1 for p in reduced["drops"].values() for v in p.values() if v["step"] == DECODE_STEP)
    if duplicate_keys:
        funnel.drop(DECODE_STEP, "duplicate key", duplicate_keys)
    digest = hashlib.sha256()
    buf = io.BytesIO()
    schema = pa.schema([("key", pa.string()), ("kept", pa.bool_()), ("step", pa.string()), ("reason", pa.string()),
                        ("detail", pa.string()), ("scores", pa.string()), ("shard", pa.string())])  # fmt: skip
    with pq.ParquetWriter(buf, schema) as writer:
        position = 0
        for i, part_shards in enumerate(shards):
            table = pq.read_table(store.open(f"{_part_dir(out, i)}/manifest.parquet")).to_pydict()
            drops = {int(k.rsplit("#", 1)[1]): v for k, v in reduced["drops"].get(str(i), {}).items()}
            names = iter([s["path"] for s in part_shards for _ in range(s["samples"])])
            table["shard"] = []
            for r in range(len(table["key"])):
                if table["kept"][r]:
                    verdict = drops.get(position)
                    position += 1
                    if verdict:
                        table["kept"][r] = False
                        table["step"][r], table["reason"][r], table["detail"][r] = verdict["step"], verdict["reason"], verdict["detail"]
                        scores = json.loads(table["scores"][r] or "{}")
                        scores.update({f"{verdict['step']}/{k}": v for k, v in verdict["scores"].items()})
                        table["scores"][r] = json.dumps(scores, sort_keys=True) if scores else ""
                table["shard"].append(next(names) if table["kept"][r] else None)
                digest.update(f"{table['key'][r]}\t{table['kept'][r]}\t{table['step'][r]}\t{table['reason'][r]}\n".encode())
            writer.write_table(pa.table(table, schema=schema))
    store.write_bytes(f"{out}/manifest.parquet", buf.getvalue())
    flat = [s for part in shards for s in part]
    for shard in flat:
        digest.update(shard["sha256"].encode())
    n_input = sum(p["input"] for p in parts)
    if n_input == 0:
        raise StageError(f"curate: the training dataset {recipe.data.train.type!r} yielded no samples")
    summary = {
        "format": FORMAT_VERSION,
        "input": n_input,
        "kept": sum(s["samples"] for s in flat),
        "parts": len(parts),
        "funnel": funnel.as_dict(),
        "shards": flat,
        "manifest": f"{out}/manifest.parquet",
        "manifest_uri": store.uri(f"{out}/manifest.parquet"),
        "content_hash": digest.hexdigest(),
        "seconds": round(seconds, 3),
        "pairs_per_s": round(n_input / seconds, 1) if seconds > 0 else None,
    }
    store.write_json(f"{out}/summary.json", summary)  # written last: its presence marks a complete curation
    return summary


def curate(recipe: Recipe, catalog: Catalog, store: Store, out: str, *, shard_size: int = 1000, progress: bool = True) -> dict[str, Any]:
    """All three phases in this process, one part after the other (the flow maps them over a task runner)."""
    from tqdm.auto import tqdm

    if store.exists(f"{out}/summary.json"):
        return store.read_json(f"{out}/summary.json")
    start = time.perf_counter()
    entries = parts_of(recipe, catalog)
    parts = [curate_part(recipe, catalog, store, out, i, e) for i, e in enumerate(tqdm(entries, desc="curate", unit="part", disable=None if progress else True))]
    reduced = reduce(recipe, catalog, store, out, len(entries))
    size, firsts = input_size(recipe), first_positions(parts)
    shards = [
        finalize_part(store, out, i, firsts[i], reduced["drops"].get(str(i), {}), size, shard_size)
        for i in range(len(entries))
    ]
    return assemble(recipe, store, out, parts, reduced, shards, time.perf_counter() - start)
