"""Content keys: the sha256 of a value's canonical JSON.

Stored curation folders, training caches, recipe digests and evaluation data hashes are named
by these keys, so the serialisation must never change: keys sorted (unless the caller's value
was always hashed in insertion order), compact defaults of :func:`json.dumps`, anything JSON
does not know written as its ``str``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(obj: Any, *, sort_keys: bool = True) -> str:
    """``obj`` as the JSON its content key is computed from."""
    return json.dumps(obj, sort_keys=sort_keys, default=str)


def content_hash(obj: Any, length: int | None = None, *, sort_keys: bool = True) -> str:
    """The hex sha256 of :func:`canonical_json` of ``obj``, its first ``length`` characters when given."""
    digest = hashlib.sha256(canonical_json(obj, sort_keys=sort_keys).encode()).hexdigest()
    return digest[:length] if length is not None else digest
