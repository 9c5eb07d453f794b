"""Warm starts (``train.init_from``) and weight averaging with the starting weights (WiSE-FT)."""

from __future__ import annotations

from typing import Any

import torch

from clipforge.core.errors import ConfigError
from clipforge.core.recipe import TrainConfig
from clipforge.core.resolver import pin_model, resolve_model
from clipforge.core.storage import Store


def warm_start(
    model: torch.nn.Module, cfg: TrainConfig, store: Store, out: str, storage_options: dict[str, Any], *, lead: bool
) -> tuple[str | None, dict[str, torch.Tensor] | None]:
    """Load ``train.init_from`` into ``model``; return the pinned reference and, for WiSE-FT, the initial weights.

    The reference is pinned once (an alias as the version it points at) and recorded in
    ``<out>/init.json``: a resumed run starts from the same weights even if the alias moved.
    """
    if not cfg.init_from:
        return None, None
    recorded = store.exists(f"{out}/init.json")
    try:
        uri = store.read_json(f"{out}/init.json")["init_from"] if recorded else pin_model(cfg.init_from)
        weights = resolve_model(uri, storage_options).state_dict()
    except ConfigError as e:
        raise ConfigError(f"train.init_from: {e}") from None
    load_initial_weights(model, weights, uri)
    if lead and not recorded:
        store.write_json(f"{out}/init.json", {"init_from": uri, "requested": cfg.init_from})
    return uri, (weights if cfg.weight_average is not None else None)


def load_initial_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], uri: str) -> None:
    ours = model.state_dict()
    missing, unexpected = sorted(set(ours) - set(weights)), sorted(set(weights) - set(ours))
    shapes = sorted(k for k in set(ours) & set(weights) if ours[k].shape != weights[k].shape)
    problems = [
        f"{what}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", shapes))
        if keys
    ]
    if problems:
        raise ConfigError(f"train.init_from: {uri} does not fit the recipe's model: " + "; ".join(problems))
    model.load_state_dict(weights)


def weight_average(model: torch.nn.Module, initial: dict[str, torch.Tensor], alpha: float) -> None:
    """WiSE-FT: ``theta = (1 - alpha) * initial + alpha * trained`` on every floating-point tensor."""
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                value.copy_(torch.lerp(initial[name].to(value), value, alpha))
