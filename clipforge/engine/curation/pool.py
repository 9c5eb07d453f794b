"""The pool a curation is decided against (the recipe's ``curation_pool``): earlier curated data,
read from what its curation left on the store, never recomputed.

Every curation leaves ``features.json`` beside its manifest: how many parts it had and, for each
whole-dataset step, its type and features signature (the parts' features files hold the features
themselves). A pool is the curation its manifest names and, through each summary's ``pool``, the
curations that one was decided against, oldest first: a weekly crawl curated against the pool is
deduplicated against every week before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from clipforge.core.components import DecidesAgainstPool, Pool
from clipforge.core.errors import ConfigError
from clipforge.core.storage import Store
from clipforge.engine.curation.layout import (
    DECODE_STEP,
    FEATURES_INDEX,
    MANIFEST,
    REDUCED,
    SUMMARY,
    curation_folder,
    survivor_features,
    survivor_keys,
)


@dataclass(frozen=True)
class PoolCuration:
    """One curation of a pool: its manifest's URI, the store holding its folder ``out``, its index."""

    manifest: str
    store: Store
    out: str
    index: dict[str, Any]
    content_hash: str


class PoolChain:
    """The curations of a pool, oldest first; :meth:`view` gives a step its part of them."""

    def __init__(self, curations: list[PoolCuration], statistics: bool = True) -> None:
        self.curations, self.statistics = curations, statistics

    @property
    def manifest(self) -> str:
        """The manifest the pool was named by: the newest curation's."""
        return self.curations[-1].manifest

    def identity(self) -> dict[str, Any]:
        """What a curation against this pool depends on: each curation's content, and whether statistics count it."""
        return {"curations": [c.content_hash for c in self.curations], "statistics": self.statistics}

    def view(self, step_type: str, step: DecidesAgainstPool) -> Pool:
        """The pool as ``step`` sees it: the samples a step of its type and features signature saw in
        each curation, with their features and whether the curation kept them."""
        signature = step.features_signature()
        keys: list[str] = []
        kept: list[bool] = []
        features: list[Any] = []
        ends: list[int] = []
        for c in self.curations:
            k, f, kp = _seen_by(c, label_in(c, step_type, signature))
            keys += k
            kept += kp
            features.append(f)
            ends.append(len(keys))
        arrays = [f for f in features if isinstance(f, np.ndarray) and len(f)]
        merged: Any = np.concatenate(arrays) if arrays else [x for f in features for x in f]
        return Pool(
            keys=keys, features=merged, kept=kept, manifests=[c.manifest for c in self.curations], ends=ends,
            statistics=self.statistics,
        )  # fmt: skip


def label_in(c: PoolCuration, step_type: str, signature: dict[str, Any]) -> str:
    """The label of curation ``c``'s step of this type and features signature, or a clear error."""
    label = next((s["label"] for s in c.index["steps"] if s["type"] == step_type and s["signature"] == signature), None)
    if label is None:
        done = [f"{s['type']} {s['signature']}" for s in c.index["steps"] if s["signature"] is not None]
        raise ConfigError(
            f"curation_pool: {c.manifest} holds no features of a {step_type!r} step with {signature}, "
            f"so its samples cannot be compared without recomputing them (it has: {'; '.join(done) or 'none'}); "
            f"curate against a pool made with the same step, or leave curation_pool out"
        )
    return str(label)


def stopped_at(c: PoolCuration) -> tuple[list[str], dict[int, int]]:
    """Curation ``c``'s funnel order (decode, then its whole-dataset steps) and, for each survivor of its
    parts that a whole-dataset step dropped, by position, where in that order it stopped."""
    order = [DECODE_STEP, *[s["label"] for s in c.index["steps"]]]
    reduced = c.store.read_json(f"{c.out}/{REDUCED}")
    return order, {d["position"]: order.index(d["step"]) for d in reduced["drops"]}


def _seen_by(c: PoolCuration, label: str) -> tuple[list[str], Any, list[bool]]:
    """The samples step ``label`` of curation ``c`` saw, its features of them, and which of them the curation kept."""
    keys = survivor_keys(c.store, c.out, c.index["parts"])
    order, stopped = stopped_at(c)
    at = order.index(label)
    seen = np.array([stopped.get(p, len(order)) >= at for p in range(len(keys))], dtype=bool)
    index = np.flatnonzero(seen)
    features = survivor_features(c.store, c.out, c.index["parts"], label, index)
    return [keys[p] for p in index], features, [p not in stopped for p in index]


def open_pool(manifest: str, options: dict[str, Any] | None = None, *, statistics: bool = True) -> PoolChain:
    """The pool named by a curated manifest's URI (a local path or ``s3://...``), checked: the manifest
    and its summary and features index exist, and so do those of the curations it was decided against."""
    curations: list[PoolCuration] = []
    uri: str | None = manifest
    while uri:
        if any(c.manifest == uri for c in curations):
            raise ConfigError(f"curation_pool: {manifest} leads back to {uri} through the pools it was curated against")
        root, out = curation_folder(uri, "curation_pool")
        store = Store(root, options)
        for needed in (MANIFEST, SUMMARY):
            if not store.exists(f"{out}/{needed}"):
                raise ConfigError(f"curation_pool: {uri}: no complete curation there ({store.uri(out, needed)} is missing)")
        if not store.exists(f"{out}/{FEATURES_INDEX}"):
            raise ConfigError(
                f"curation_pool: {uri} has no stored features ({FEATURES_INDEX}): it was curated by an earlier "
                "version of clipforge; curate that data again to use it as a pool"
            )
        summary = store.read_json(f"{out}/{SUMMARY}")
        curations.append(PoolCuration(uri, store, out, store.read_json(f"{out}/{FEATURES_INDEX}"), summary["content_hash"]))
        uri = summary.get("pool")
    return PoolChain(curations[::-1], statistics)
