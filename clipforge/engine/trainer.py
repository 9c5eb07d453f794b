"""The training loop: AdamW with open_clip's parameter groups, warmup + cosine, checkpoints that resume exactly."""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from clipforge.core.catalog import Catalog
from clipforge.core.checkpoint import save_open_clip_dir, state_dict_for_safetensors
from clipforge.core.errors import StageError
from clipforge.core.recipe import Recipe, TrainConfig
from clipforge.core.storage import Store
from clipforge.engine.data import ShardPairs, steps_in_epoch

StepCallback = Callable[[int, dict[str, float]], None]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. ``auto``: bf16 on CUDA, fp32 on CPU (where bf16 is several times slower)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """open_clip's groups: no weight decay on gains, biases, norms and the logit scale."""

    def exclude(name: str, p: torch.nn.Parameter) -> bool:
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name or "logit_bias" in name

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay},
    ]


def lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    """Linear warmup, then cosine to zero or constant (open_clip_train's schedules)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * progress)) * cfg.lr


# -- checkpoints ----------------------------------------------------------------------------


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors = {
        f"{idx}.{name}": value.detach().cpu().contiguous()
        for idx, slots in state["state"].items()
        for name, value in slots.items()
        if torch.is_tensor(value)
    }
    return tensors, {"param_groups": state["param_groups"]}


def save_checkpoint(store: Store, out: str, step: int, epoch: int, model, optimizer, scaler) -> str:
    rel = f"{out}/checkpoints/step-{step:08d}"
    tensors, groups = _optimizer_tensors(optimizer)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    store.write_bytes(f"{rel}/model.safetensors", save_safetensors(state_dict_for_safetensors(model)))
    store.write_bytes(f"{rel}/optimizer.safetensors", save_safetensors(tensors))
    store.write_bytes(f"{rel}/rng.safetensors", save_safetensors(rng))
    meta = {"step": step, "epoch": epoch, "optimizer": groups, "scaler": scaler.state_dict() if scaler else None}
    store.write_json(f"{rel}/state.json", meta)  # last: marks the checkpoint complete
    return rel


def latest_checkpoint(store: Store, out: str) -> str | None:
    for name in reversed(store.ls(f"{out}/checkpoints")):
        rel = f"{out}/checkpoints/{name}"
        if name.startswith("step-") and store.exists(f"{rel}/state.json"):
            return rel
    return None


def load_checkpoint(store: Store, rel: str, model, optimizer, scaler) -> dict[str, Any]:
    meta = store.read_json(f"{rel}/state.json")
    model.load_state_dict(load_safetensors(store.read_bytes(f"{rel}/model.safetensors")))
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
    return meta


# -- the loop -------------------------------------------------------------------------------


def train(
    recipe: Recipe,
    catalog: Catalog,
    store: Store,
    out: str,
    shards: list[dict[str, Any]],
    *,
    on_step: StepCallback | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the recipe's model on curated ``shards``; checkpoints and the final model go under ``out``.

    Resumes from the latest complete checkpoint under ``out``; returns the result summary
    (also ``out/result.json``, whose presence marks the training complete).
    """
    from tqdm.auto import tqdm

    cfg = recipe.train
    if store.exists(f"{out}/result.json"):
        return store.read_json(f"{out}/result.json")
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    amp_dtype = resolve_precision(cfg.precision, device)
    bundle = catalog.create("encoders", recipe.model.entry())
    model = bundle.model.to(device)
    loss_fn = catalog.create("losses", recipe.loss.entry()).to(device)
    workers = cfg.workers
    per_epoch = [steps_in_epoch(shards, cfg.seed, e, workers, cfg.batch_size) for e in range(cfg.epochs)]
    total = sum(per_epoch)
    n_pairs = sum(s["samples"] for s in shards)
    if total == 0:
        raise StageError(
            f"train: {n_pairs} curated pairs give no full batch of train.batch_size={cfg.batch_size}"
            + (f" per loader worker ({workers} workers)" if workers > 1 else "")
            + "; lower the batch size or add data"
        )
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps
    )
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    step, start_epoch, skip = 0, 0, 0
    resumed_from = latest_checkpoint(store, out)
    if resumed_from:
        step = load_checkpoint(store, resumed_from, model, optimizer, scaler)["step"]
        done = 0
        for start_epoch, n in enumerate(per_epoch):
            if step < done + n:
                break
            done += n
        skip = step - done

    every = cfg.checkpoint_every
    history: list[dict[str, float]] = []
    # disable=None: a bar on terminals only, never in the logs of workers and CI
    bar = tqdm(total=total, initial=step, desc="train", unit="step", disable=None if progress else True)
    t_start = time.perf_counter()
    samples_done = 0
    model.train()
    for epoch in range(start_epoch, cfg.epochs):
        pairs = ShardPairs(
            store, shards, bundle.preprocess_train, bundle.tokenizer,
            seed=cfg.seed, epoch=epoch, batch_size=cfg.batch_size, workers=workers,
            skip_batches=skip if epoch == start_epoch else 0,
        )  # fmt: skip
        loader = torch.utils.data.DataLoader(
            pairs, batch_size=cfg.batch_size, num_workers=workers, drop_last=True,
            pin_memory=device.type == "cuda",
            # forked workers inherit the threads of Prefect and MLflow clients and die at exit
            multiprocessing_context="forkserver" if workers else None,
        )  # fmt: skip
        t_last = time.perf_counter()
        for images, tokens in loader:
            lr = lr_at(cfg, step, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images, tokens = images.to(device, non_blocking=True), tokens.to(device, non_blocking=True)
            autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
            with autocast:
                out_dict = model(images, tokens)
                losses = loss_fn(
                    out_dict["image_features"], out_dict["text_features"], out_dict["logit_scale"], out_dict.get("logit_bias")
                )
            loss = losses["loss"] if isinstance(losses, dict) else losses
            if not torch.isfinite(loss):
                last = latest_checkpoint(store, out)
                raise StageError(
                    f"train: the loss is {loss.item()} at step {step + 1}; stopped"
                    + (f" (the last good checkpoint is {store.uri(last)})" if last else " before any checkpoint")
                )
            optimizer.zero_grad(set_to_none=True)
            if scaler:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            with torch.no_grad():  # as open_clip: the temperature never exceeds 100
                model.logit_scale.clamp_(0, math.log(100))
            step += 1
            now = time.perf_counter()
            samples_done += images.shape[0]
            metrics = {
                "loss": loss.item(),
                "lr": lr,
                "logit_scale": model.logit_scale.exp().item(),
                "samples_per_s": images.shape[0] / max(now - t_last, 1e-9),
                "epoch": epoch + 1,
            }
            t_last = now
            history.append({"step": step, **metrics})
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}")
            if on_step:
                on_step(step, metrics)
            if every and step % every == 0 and step < total:
                save_checkpoint(store, out, step, epoch, model, optimizer, scaler)
        skip = 0
    bar.close()
    elapsed = time.perf_counter() - t_start
    if step != total:
        raise StageError(f"train: expected {total} steps but the data gave {step}; the shards changed under the run?")
    final_ckpt = save_checkpoint(store, out, step, cfg.epochs - 1, model, optimizer, scaler)
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        bundle.model = model.cpu()
        save_open_clip_dir(bundle, tmp, extra={"recipe": recipe.name, "steps": step})
        model_uri = store.put_dir(tmp, f"{out}/model")
    result = {
        "steps": step,
        "epochs": cfg.epochs,
        "pairs": n_pairs,
        "final_loss": history[-1]["loss"] if history else None,
        "samples_per_s": round(samples_done / elapsed, 1) if samples_done else None,
        "seconds": round(elapsed, 2),
        "resumed_from": resumed_from,
        "checkpoint": final_ckpt,
        "model": f"{out}/model",
        "model_uri": model_uri,
        "device": str(device),
        "precision": str(amp_dtype or "fp32"),
    }
    store.write_bytes(f"{out}/history.json", json.dumps(history).encode())
    store.write_json(f"{out}/result.json", result)
    return result
