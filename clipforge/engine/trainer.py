"""The training loop: AdamW with open_clip's parameter groups, warmup + cosine, checkpoints that resume exactly."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from clipforge.core.catalog import Catalog
from clipforge.core.checkpoint import save_open_clip_dir, state_dict_for_safetensors
from clipforge.core.errors import ConfigError, StageError
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


# -- warm start, distribution, accumulation ------------------------------------------------------


def pin_model_uri(uri: str) -> str:
    """``models:/NAME@ALIAS`` -> ``models:/NAME/VERSION``, so a resumed run starts from the same weights."""
    if not uri.startswith("models:/") or "@" not in uri:
        return uri
    from mlflow.tracking import MlflowClient

    name, alias = uri.removeprefix("models:/").split("@", 1)
    try:
        version = MlflowClient().get_model_version_by_alias(name, alias).version
    except Exception as e:  # MLflow raises RestException or MlflowException
        raise ConfigError(f"train.init_from: {uri}: no such registered model alias ({e})") from None
    return f"models:/{name}/{version}"


def initial_weights(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The weights of a registered model, open_clip folder or checkpoint, read with safetensors."""
    from clipforge.core.model_source import fetch_model, weights_file

    with tempfile.TemporaryDirectory() as tmp:
        return load_safetensors(weights_file(fetch_model(uri, tmp, storage_options)).read_bytes())


def load_initial_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], uri: str) -> None:
    ours = model.state_dict()
    missing, unexpected = sorted(set(ours) - set(weights)), sorted(set(weights) - set(ours))
    shapes = [k for k in set(ours) & set(weights) if ours[k].shape != weights[k].shape]
    if missing or unexpected or shapes:
        raise ConfigError(
            f"train.init_from: {uri} does not fit the recipe's model: "
            + "; ".join(
                f"{what}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                for what, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", sorted(shapes)))
                if keys
            )
        )
    model.load_state_dict(weights)


def weight_average(model: torch.nn.Module, initial: dict[str, torch.Tensor], alpha: float) -> None:
    """WiSE-FT: ``theta = (1 - alpha) * initial + alpha * trained`` on every floating-point tensor."""
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                value.copy_(torch.lerp(initial[name].to(value), value, alpha))


def distributed_setup(device: torch.device) -> tuple[int, int, torch.device]:
    """Under ``torchrun`` (WORLD_SIZE > 1): join the process group; return (rank, world, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def call_loss(loss_fn, out: dict[str, Any], images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """The loss of a batch as a dict with ``"loss"``; losses that ``needs_inputs`` also get the batch."""
    extra = {"images": images, "texts": tokens} if getattr(loss_fn, "needs_inputs", False) else {}
    losses = loss_fn(out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias"), **extra)
    return dict(losses) if isinstance(losses, dict) else {"loss": losses}


def forward_backward(
    model,
    loss_fn,
    micro: list[tuple[torch.Tensor, torch.Tensor]],
    autocast: Callable[[], contextlib.AbstractContextManager],
    backward: Callable[[torch.Tensor], None],
) -> dict[str, torch.Tensor]:
    """Gradients of the loss over the whole accumulated batch ``micro`` (a list of micro-batches).

    As open_clip_train's ``accum_freq``: the features of every micro-batch are first computed
    without gradients; then each micro-batch is forwarded again with gradients and the loss of
    the full batch (its own features live, the others cached) is backpropagated. The sum of
    these gradients is the gradient of the full-batch loss; unlike open_clip_train, the logit
    scale and bias are live only in the first pass, so their gradients are not counted
    ``len(micro)`` times. Costs one extra forward per micro-batch.
    """
    if len(micro) == 1:
        images, tokens = micro[0]
        with autocast():
            losses = call_loss(loss_fn, model(images, tokens), images, tokens)
        if torch.isfinite(losses["loss"]):
            backward(losses["loss"])
        return losses
    with torch.no_grad(), autocast():
        cached = [model(images, tokens) for images, tokens in micro]
    all_images, all_tokens = torch.cat([m[0] for m in micro]), torch.cat([m[1] for m in micro])
    sync = getattr(model, "no_sync", None)  # DDP: all-reduce the gradients once, after the last pass
    for j, (images, tokens) in enumerate(micro):
        last = j == len(micro) - 1
        with contextlib.nullcontext() if (last or sync is None) else sync():
            with autocast():
                live = model(images, tokens)
                out = {
                    key: torch.cat([live[key] if i == j else c[key] for i, c in enumerate(cached)])
                    for key in ("image_features", "text_features")
                }
                for key in ("logit_scale", "logit_bias"):
                    if live.get(key) is not None:
                        out[key] = live[key] if j == 0 else live[key].detach()
                losses = call_loss(loss_fn, out, all_images, all_tokens)
            if not torch.isfinite(losses["loss"]):
                return losses
            backward(losses["loss"])
    return losses


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
    (also ``out/result.json``, whose presence marks the training complete). Under ``torchrun``
    each process trains its slice of every global batch of ``batch_size * world_size`` pairs
    with DDP; rank 0 writes the checkpoints and the model.
    """
    cfg = recipe.train
    if store.exists(f"{out}/result.json"):
        return store.read_json(f"{out}/result.json")
    rank, world, device = distributed_setup(resolve_device(cfg.device))
    with cores_for_loader(device, cfg.workers, world):
        return _train(recipe, catalog, store, out, shards, rank, world, device, on_step, progress)


@contextlib.contextmanager
def cores_for_loader(device: torch.device, workers: int, world: int) -> Iterator[None]:
    """On the CPU, leave a core to each loader worker: torch's threads and busy workers on the same
    cores slow each other down more than the threads speed up the step. ``OMP_NUM_THREADS`` wins."""
    if device.type != "cpu" or not workers or "OMP_NUM_THREADS" in os.environ:
        yield
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    saved = torch.get_num_threads()
    torch.set_num_threads(max(1, min(saved, cores // world - workers)))
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _train(recipe: Recipe, catalog: Catalog, store: Store, out: str, shards: list[dict[str, Any]], rank: int, world: int,
           device: torch.device, on_step: StepCallback | None, progress: bool) -> dict[str, Any]:  # fmt: skip
    from tqdm.auto import tqdm

    cfg = recipe.train
    lead = rank == 0
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    amp_dtype = resolve_precision(cfg.precision, device)
    bundle = catalog.create("encoders", recipe.model.entry())
    model = bundle.model.to(device)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    loss_fn = catalog.create("losses", recipe.loss.entry()).to(device)
    if hasattr(loss_fn, "prepare"):
        loss_fn.prepare(bundle)
    workers, accum = cfg.workers, cfg.accum_steps
    global_batch = cfg.batch_size * world
    per_epoch = [steps_in_epoch(shards, cfg.seed, e, workers, global_batch) // accum for e in range(cfg.epochs)]
    total = sum(per_epoch)
    n_pairs = sum(s["samples"] for s in shards)
    if total == 0:
        raise StageError(
            f"train: {n_pairs} curated pairs give no full batch of train.batch_size={cfg.batch_size}"
            + (f" x {world} processes" if world > 1 else "")
            + (f" x train.accum_steps={accum}" if accum > 1 else "")
            + (f" per loader worker ({workers} workers)" if workers > 1 else "")
            + "; lower the batch size or add data"
        )
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
        # one kernel for all parameters: the default loops over tensors, which on the CPU costs a third of a small model's step
        fused=device.type in ("cpu", "cuda"),
    )  # fmt: skip
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    init_from, initial = None, None
    if cfg.init_from:
        # the alias is resolved once: a resumed run starts from the version the first attempt used
        if store.exists(f"{out}/init.json"):
            init_from = store.read_json(f"{out}/init.json")["init_from"]
        else:
            init_from = pin_model_uri(cfg.init_from)
        initial = initial_weights(init_from, recipe.storage.options)
        load_initial_weights(model, initial, init_from)
        if lead and not store.exists(f"{out}/init.json"):
            store.write_json(f"{out}/init.json", {"init_from": init_from, "requested": cfg.init_from})
        if cfg.weight_average is None:
            initial = None

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
    trained = model
    if world > 1:
        trained = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()

    def backward(loss: torch.Tensor) -> None:
        (scaler.scale(loss) if scaler else loss).backward()

    every = cfg.checkpoint_every
    history: list[dict[str, float]] = []
    # disable=None: a bar on terminals only, never in the logs of workers and CI
    bar = tqdm(total=total, initial=step, desc="train", unit="step", disable=None if (progress and lead) else True)
    t_start = time.perf_counter()
    samples_done = 0
    model.train()
    loss_fn.train()
    for epoch in range(start_epoch, cfg.epochs):
        pairs = ShardPairs(
            store, shards, bundle.preprocess_train, bundle.tokenizer,
            seed=cfg.seed, epoch=epoch, batch_size=cfg.batch_size, workers=workers,
            skip_batches=skip * accum if epoch == start_epoch else 0, rank=rank, world=world,
        )  # fmt: skip
        loader = torch.utils.data.DataLoader(
            pairs, batch_size=cfg.batch_size, num_workers=workers, drop_last=True,
            pin_memory=device.type == "cuda",
            # forked workers inherit the threads of Prefect and MLflow clients and die at exit
            multiprocessing_context="forkserver" if workers else None,
        )  # fmt: skip
        batches = iter(loader)
        t_last = time.perf_counter()
        # every rank takes exactly the planned number of steps (the ranks' last partial batches differ)
        for _ in range(per_epoch[epoch] - (skip if epoch == start_epoch else 0)):
            try:
                micro = [tuple(t.to(device, non_blocking=True) for t in next(batches)) for _ in range(accum)]
            except StopIteration:
                raise StageError(
                    f"train: epoch {epoch + 1} ended before its {per_epoch[epoch]} steps; the shards changed under the run?"
                ) from None
            lr = lr_at(cfg, step, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            losses = forward_backward(trained, loss_fn, micro, autocast, backward)
            loss = losses["loss"]
            if not torch.isfinite(loss):
                last = latest_checkpoint(store, out)
                raise StageError(
                    f"train: the loss is {loss.item()} at step {step + 1}; stopped"
                    + (f" (the last good checkpoint is {store.uri(last)})" if last else " before any checkpoint")
                )
            if scaler:
                scaler.unscale_(optimizer)
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
            n = global_batch * accum
            samples_done += n
            metrics = {
                "loss": loss.item(),
                **{k: v.item() for k, v in losses.items() if k != "loss"},
                "lr": lr,
                "logit_scale": model.logit_scale.exp().item(),
                "samples_per_s": n / max(now - t_last, 1e-9),
                "epoch": epoch + 1,
            }
            t_last = now
            history.append({"step": step, **metrics})
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}")
            if on_step and lead:
                on_step(step, metrics)
            if every and step % every == 0 and step < total:
                if lead:
                    save_checkpoint(store, out, step, epoch, model, optimizer, scaler)
                if world > 1:
                    torch.distributed.barrier()
        skip = 0
    bar.close()
    elapsed = time.perf_counter() - t_start
    if not lead:
        torch.distributed.barrier()  # rank 0 writes the final checkpoint and the model
        return store.read_json(f"{out}/result.json")
    final_ckpt = save_checkpoint(store, out, step, cfg.epochs - 1, model, optimizer, scaler)
    model.eval()
    if initial is not None:
        weight_average(model, initial, cfg.weight_average.alpha)
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
        "init_from": init_from,
        "weight_average_alpha": cfg.weight_average.alpha if cfg.weight_average else None,
        "world_size": world,
        "checkpoint": final_ckpt,
        "model": f"{out}/model",
        "model_uri": model_uri,
        "device": str(device),
        "precision": str(amp_dtype or "fp32"),
    }
    store.write_bytes(f"{out}/history.json", json.dumps(history).encode())
    store.write_json(f"{out}/result.json", result)
    if world > 1:
        torch.distributed.barrier()
    return result
