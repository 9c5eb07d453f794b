"""Checkpoints: ``<out>/checkpoints/step-NNNNNNNN/`` with the model, the optimizer and the random
state as safetensors, and ``state.json`` (written last: it marks the checkpoint complete).

With an adapter the model's frozen base is rebuilt from the recipe on resume, so the checkpoint
holds only what trains (``trainable.safetensors``: the adapter and what the recipe unlocks) and
its optimizer state; with ``train.ema`` the average is ``ema.safetensors``."""

from __future__ import annotations

from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from clipforge.core.checkpoint import state_dict_for_safetensors
from clipforge.core.errors import ConfigError
from clipforge.core.storage import Store
from clipforge.engine.training.ema import WeightEma
from clipforge.engine.training.state import TrainState

TRAINABLE = "trainable.safetensors"
EMA = "ema.safetensors"


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors = {
        f"{idx}.{name}": value.detach().cpu().contiguous()
        for idx, slots in state["state"].items()
        for name, value in slots.items()
        if torch.is_tensor(value)
    }
    return tensors, {"param_groups": state["param_groups"]}


def _rng_state() -> dict[str, torch.Tensor]:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return rng


def save_checkpoint(
    store: Store,
    out: str,
    state: TrainState,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    open_clip_config: dict[str, Any] | None = None,
    *,
    trainable_only: bool = False,
    ema: WeightEma | None = None,
) -> str:
    """Write a checkpoint of ``state``; return its folder. ``open_clip_config`` (``model_cfg`` and
    ``preprocess_cfg``) makes the checkpoint loadable as a model on its own (``clipforge evaluate``)."""
    rel = f"{out}/checkpoints/step-{state.step:08d}"
    tensors, groups = _optimizer_tensors(optimizer)
    if trainable_only:
        trained = {n: p.detach().cpu().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}
        store.write_bytes(f"{rel}/{TRAINABLE}", save_safetensors(trained))
    else:
        store.write_bytes(f"{rel}/model.safetensors", save_safetensors(state_dict_for_safetensors(model)))
    if ema is not None:
        store.write_bytes(f"{rel}/{EMA}", save_safetensors(ema.state()))
    store.write_bytes(f"{rel}/optimizer.safetensors", save_safetensors(tensors))
    store.write_bytes(f"{rel}/rng.safetensors", save_safetensors(_rng_state()))
    meta: dict[str, Any] = {
        "step": state.step,
        "epoch": state.epoch,
        "optimizer": groups,
        "scaler": scaler.state_dict() if scaler else None,
        "trainable_only": trainable_only,
        "ema_updates": ema.updates if ema is not None else None,
    }
    if open_clip_config is not None and not trainable_only:  # a model on its own only with every weight
        meta["open_clip_config"] = open_clip_config
    store.write_json(f"{rel}/state.json", meta)  # last: marks the checkpoint complete
    return rel


def latest_checkpoint(store: Store, out: str) -> str | None:
    for name in reversed(store.ls(f"{out}/checkpoints")):
        rel = f"{out}/checkpoints/{name}"
        if name.startswith("step-") and store.exists(f"{rel}/state.json"):
            return rel
    return None


def load_checkpoint(
    store: Store,
    rel: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    ema: WeightEma | None = None,
) -> TrainState:
    """Restore the model, the optimizer, the scaler, the EMA and the random state of the checkpoint ``rel``."""
    meta = store.read_json(f"{rel}/state.json")
    if meta.get("trainable_only"):
        trained = load_safetensors(store.read_bytes(f"{rel}/{TRAINABLE}"))
        ours = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if trained.keys() != ours.keys():
            raise ConfigError(f"{store.uri(rel)}: its trained weights are not the ones this recipe's adapter trains")
        with torch.no_grad():
            for n, p in ours.items():
                p.copy_(trained[n])
    else:
        model.load_state_dict(load_safetensors(store.read_bytes(f"{rel}/model.safetensors")))
    if ema is not None:
        if meta.get("ema_updates") is None:
            raise ConfigError(f"{store.uri(rel)}: a checkpoint without the EMA that train.ema asks for")
        ema.load(load_safetensors(store.read_bytes(f"{rel}/{EMA}")), meta["ema_updates"])
    tensors = load_safetensors(store.read_bytes(f"{rel}/optimizer.safetensors"))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        idx, slot = name.split(".", 1)
        state.setdefault(int(idx), {})[slot] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    rng = load_safetensors(store.read_bytes(f"{rel}/rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[k] for k in sorted(rng) if k.startswith("cuda")])
    if scaler and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    return TrainState(step=meta["step"], epoch=meta["epoch"])
