"""Content keys and metric names come from one helper each, and the keys are those stored before.

Curation folders, training caches, replay folders and recipe digests are named by
``content_hash``: a key that changed would orphan every stored result, so the helper must give
exactly the digests of the serialisations each call site used (pinned below, and checked against
them on arbitrary JSON values).
"""

from __future__ import annotations

import hashlib
import json

from hypothesis import given
from hypothesis import strategies as st

from clipforge.core.hashing import canonical_json, content_hash
from clipforge.core.metrics import EVAL_PREFIX, eval_name, metric_key

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@given(json_values)
def test_content_hash_is_the_digest_each_call_site_computed(value):
    # training and curation keys: sorted keys, str() for what JSON lacks, 16 characters
    assert content_hash(value, 16) == hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]
    # recipe digests: sorted keys, the whole digest
    assert content_hash(value) == hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
    # replay folders: insertion order
    assert content_hash(value, 16, sort_keys=False) == hashlib.sha256(json.dumps(value).encode()).hexdigest()[:16]
    # dataset keys of the evaluation data hash
    assert canonical_json(value) == json.dumps(value, sort_keys=True, default=str)


def test_content_hash_of_a_stored_key_is_pinned():
    spec = {"v": 2, "data": {"type": "synthetic-shapes", "size": 160}, "steps": [{"type": "caption-length"}], "size": 32}
    assert content_hash(spec, 16) == "d79a17862e3ca206"
    assert content_hash({"pool": [("ab", 3)], "take": 2, "seed": 0}, 16, sort_keys=False) == "9b77754527f78d51"
    assert content_hash(spec) == hashlib.sha256(canonical_json(spec).encode()).hexdigest()


@given(st.text(alphabet="abc/@_1", max_size=20))
def test_eval_name_prefixes_once_and_metric_key_removes_every_at_sign(name):
    assert eval_name(name).startswith(EVAL_PREFIX)
    assert eval_name(eval_name(name)) == eval_name(name)
    assert eval_name(name).removeprefix(EVAL_PREFIX) == name.removeprefix(EVAL_PREFIX)
    assert "@" not in metric_key(name) and metric_key(metric_key(name)) == metric_key(name)


def test_the_documented_forms_of_a_metric():
    assert eval_name("retrieval/mean_recall@1") == "eval/retrieval/mean_recall@1"
    assert eval_name("eval/retrieval/mean_recall@1") == "eval/retrieval/mean_recall@1"
    assert metric_key(eval_name("retrieval/mean_recall@1")) == "eval/retrieval/mean_recall_at_1"
