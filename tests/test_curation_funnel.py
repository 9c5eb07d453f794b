"""The funnel's counts chain: each step sees exactly what the step before it kept, for any mix of
good and bad samples, steps and parts (images opened only, decoded late, keys repeated across parts)."""

from __future__ import annotations

import collections
import io
import itertools
import tempfile
from typing import Any

import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import clipforge
from clipforge.core.storage import Store
from clipforge.core.validation import load_recipe
from clipforge.engine.curation import curate

KINDS = [
    "good",
    "truncated",
    "not-image",
    "empty-caption",
    "one-word",
    "small",
    "dark",
    "same-key",
    "key-of-part-0",
    "same-image",
]


def _png(colour: tuple[int, int, int], size: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


class Mix:
    """Samples of the kinds in ``spec``, split into ``parts`` parts."""

    def __init__(self, spec: list[str], parts: int = 1, part: int | None = None):
        self.spec, self.n_parts, self.part = spec, parts, part

    def parts(self) -> list[dict[str, Any]]:
        return [{"type": "mix", "spec": self.spec, "parts": self.n_parts, "part": p} for p in range(self.n_parts)]

    def __iter__(self):
        for i, kind in enumerate(self.spec):
            p = i % self.n_parts
            if self.part is not None and p != self.part:
                continue
            key, image, caption = f"k{i}", _png((i * 7 % 200 + 40, 90, 120)), f"a photo of sample {i}"
            if kind == "truncated":
                image = image[:60]
            elif kind == "not-image":
                image = b"<html>gone</html>"
            elif kind == "empty-caption":
                caption = "\u200b \x07"
            elif kind == "one-word":
                caption = "photo"
            elif kind == "small":
                image = _png((10, 200, 10), 6)
            elif kind == "dark":
                image = _png((0, 0, 0))
            elif kind == "same-key":
                key = f"k{max(i - self.n_parts, 0)}"  # the key of an earlier sample of this part
            elif kind == "key-of-part-0":
                key = "k0"
            elif kind == "same-image":
                image = _png((40, 90, 120))  # the first sample's image
            yield clipforge.Sample(key, image, caption)


class DarkFilter:
    """A per-sample step that reads pixels: images that are all black go."""

    def __call__(self, samples):
        return [
            clipforge.Verdict(max(s.image.getextrema()[0]) > 0 or max(s.image.getextrema()[1]) > 0, "dark image") for s in samples
        ]


class _Plugin:
    @clipforge.hookimpl
    def register_datasets(self, register):
        register("mix", Mix)

    @clipforge.hookimpl
    def register_curation_steps(self, register):
        register("dark-filter", DarkFilter)


LOCAL = {
    "caption-length": {"type": "caption-length", "min_words": 2},
    "image-size": {"type": "image-size", "min_side": 12},
    "dark-filter": {"type": "dark-filter"},
}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    spec=st.lists(st.sampled_from(KINDS), min_size=1, max_size=40).map(lambda s: ["good", *s]),
    parts=st.integers(1, 3),
    local=st.lists(st.sampled_from(sorted(LOCAL)), max_size=4),
    dedup=st.booleans(),
)
def test_each_step_sees_what_the_step_before_kept(fresh_plugins, spec, parts, local, dedup):
    pm = fresh_plugins()
    if "mix" not in pm.catalog.names("datasets"):
        pm.add_plugin(_Plugin(), "mix-plugin")
    steps = [LOCAL[name] for name in local] + ([{"type": "exact-duplicates"}] if dedup else [])
    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(
            {
                "name": "mix",
                "storage": {"root": tmp},
                "data": {"train": {"type": "mix", "spec": spec, "parts": parts}},
                "curation": steps,
                "model": {"type": "open-clip", "arch": "RN50"},
            },
            catalog=pm.catalog,
        )
        store = Store(tmp)
        summary = curate(recipe, pm.catalog, store, "out", progress=False)
        rows = pq.read_table(store.path(summary.manifest)).to_pylist()
    counts = list(summary.funnel.values())
    assert counts[0].seen == summary.input == len(rows) == len(spec)
    for before, after in itertools.pairwise(counts):
        assert after.seen == before.kept
    assert counts[-1].kept == summary.kept == sum(r["kept"] for r in rows)
    for step, c in summary.funnel.items():
        assert c.seen == c.kept + c.dropped and c.dropped == sum(c.reasons.values())
        in_manifest = collections.Counter(r["reason"] for r in rows if not r["kept"] and r["step"] == step)
        assert in_manifest == collections.Counter(c.reasons), step
