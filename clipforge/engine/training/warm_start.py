"""Warm starts (``train.init_from``) and weight averaging with the starting weights (WiSE-FT)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from clipforge.core.errors import ConfigError
from clipforge.core.recipe import TrainConfig
from clipforge.core.resolver import HF_HUB, pin_model, resolve_model
from clipforge.core.storage import Store

log = logging.getLogger(__name__)


def warm_start(
    model: torch.nn.Module, cfg: TrainConfig, store: Store, out: str, storage_options: dict[str, Any], *, lead: bool
) -> tuple[str | None, dict[str, torch.Tensor] | None]:
    """Load ``train.init_from`` into ``model``; return the pinned reference and, for WiSE-FT, the initial weights.

    The reference is pinned once (an alias as the version it points at, a hub revision as its
    commit) and recorded in ``<out>/init.json``: a resumed run starts from the same weights even
    if the alias moved. A model that does not exist fails, or with ``if_missing: scratch |
    pretrained`` leaves ``model`` as the recipe's ``model:`` built it (see :func:`missing_start`);
    that choice is recorded too, so a resumed run makes the same one.
    """
    requested = cfg.init_model
    if not requested:
        return None, None
    recorded = store.read_json(f"{out}/init.json") if store.exists(f"{out}/init.json") else None
    if recorded is not None and recorded["init_from"] is None:
        return None, None  # the first attempt found nothing and started without it
    try:
        uri = recorded["init_from"] if recorded is not None else pin_model(requested)
        weights = resolve_model(uri, storage_options).state_dict()
    except ConfigError as e:
        if recorded is not None or cfg.if_missing == "fail":
            raise ConfigError(f"train.init_from: {e}") from None
        log.warning("train.init_from: %s; starting from %s weights (if_missing: %s)", e, cfg.if_missing, cfg.if_missing)
        if lead:
            store.write_json(f"{out}/init.json", {"init_from": None, "requested": requested, "missing": cfg.if_missing})
        return None, None
    load_initial_weights(model, weights, uri)
    if lead and recorded is None:
        store.write_json(f"{out}/init.json", {"init_from": uri, "requested": requested})
    return uri, (weights if cfg.weight_average is not None else None)


def starts_missing(cfg: TrainConfig, store: Store, out: str, storage_options: dict[str, Any]) -> bool:
    """Whether ``train.init_from`` names a model that does not exist and ``if_missing`` says to start
    without it (what :func:`warm_start` will decide; a resumed run reads its first attempt's choice)."""
    if not cfg.init_model or cfg.if_missing == "fail":
        return False
    if store.exists(f"{out}/init.json"):
        return store.read_json(f"{out}/init.json")["init_from"] is None
    try:
        resolve_model(pin_model(cfg.init_model), storage_options)
    except ConfigError:
        return True
    return False


def without_weights(entry: dict[str, Any], storage_options: dict[str, Any]) -> dict[str, Any]:
    """``if_missing: scratch``: the encoder entry with the weights it names left out (``pretrained``,
    a ``hf-hub:`` model as its architecture alone), so that the model starts from random weights."""
    entry = {k: v for k, v in entry.items() if k != "pretrained"}
    arch = entry.get("arch")
    if isinstance(arch, str) and arch.startswith(HF_HUB):
        entry.pop("arch")
        entry["config"] = resolve_model(arch, storage_options).config
    return entry


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


def pinned_model_entry(entry: dict[str, Any], store: Store, out: str, *, lead: bool) -> tuple[dict[str, Any], str | None]:
    """The encoder entry with a ``hf-hub:`` model it names pinned to its commit, and that pinned model;
    recorded in ``<out>/base.json`` once, so that a resumed run builds the same weights."""
    hub = [k for k, v in entry.items() if isinstance(v, str) and v.startswith(HF_HUB)]
    if not hub:
        return entry, None
    if store.exists(f"{out}/base.json"):
        pinned = store.read_json(f"{out}/base.json")["pinned"]
    else:
        try:
            pinned = {k: pin_model(entry[k]) for k in hub}
        except ConfigError as e:
            raise ConfigError(f"model: {e}") from None
        if lead:
            store.write_json(f"{out}/base.json", {"pinned": pinned})
    return {**entry, **pinned}, next(iter(pinned.values()))
