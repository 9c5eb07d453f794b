"""Training through an adapter (``train.adapter``): only its parameters, and what the recipe unlocks, train."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from clipforge.core.components import Adapter
from clipforge.core.errors import ConfigError
from clipforge.core.storage import Store

#: Where the trained adapter alone is kept, in the adapter's own format, beside the merged model.
ADAPTER_DIR = "adapter"
BASE_NAME = "base_model.json"


def apply_adapter(adapter: Adapter, model: torch.nn.Module, unlock: list[str]) -> None:
    """Wrap ``model`` in ``adapter``; then unlock the parameters ``unlock`` names (a name or a dotted prefix)."""
    before = {n for n, _ in model.named_parameters()}
    adapter.apply(model)
    names = dict(model.named_parameters())
    if not any(p.requires_grad for p in names.values()):
        raise ConfigError(f"train.adapter: {type(adapter).__name__} left no parameter to train")
    for i, prefix in enumerate(unlock):
        matched = [n for n in names if n == prefix or n.startswith(prefix + ".")]
        if not matched:
            tops = sorted({n.split(".", 1)[0] for n in before})
            raise ConfigError(
                f"train.adapter.unlock.{i}: {prefix!r} names no parameter of the model; its parts: {', '.join(tops)}"
            )
        for n in matched:
            names[n].requires_grad_(True)


def trainable_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_adapter(adapter: Adapter, model: torch.nn.Module, store: Store, rel: str, base: str | None) -> str:
    """The adapter alone under ``rel`` (before it is merged), with ``base_model.json`` naming the base it belongs to."""
    with tempfile.TemporaryDirectory() as tmp:
        adapter.save(model, tmp)
        about = {"base_model": base, "trainable_parameters": trainable_count(model)}
        (Path(tmp) / BASE_NAME).write_text(json.dumps(about, indent=2))
        return store.put_dir(tmp, rel)
