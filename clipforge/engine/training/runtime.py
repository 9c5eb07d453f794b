"""Where and how the training computes: the device, the precision, the process group of DDP."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from clipforge.core.recipe import TrainConfig


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. ``auto``: bf16 on CUDA, fp32 on CPU (where bf16 is several times slower)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def distributed_setup(device: torch.device) -> tuple[int, int, torch.device]:
    """Under a launcher that starts several processes (WORLD_SIZE > 1): join the process group; return (rank, world, device)."""
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


@dataclass
class Runtime:
    """This process's part of a training: its rank among ``world``, its device, its precision."""

    rank: int
    world: int
    device: torch.device
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None

    @classmethod
    def start(cls, cfg: TrainConfig) -> Runtime:
        rank, world, device = distributed_setup(resolve_device(cfg.device))
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        amp_dtype = resolve_precision(cfg.precision, device)
        scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
        return cls(rank, world, device, amp_dtype, scaler)

    @property
    def lead(self) -> bool:
        """Rank 0 writes checkpoints and the model, and reports metrics."""
        return self.rank == 0

    @property
    def precision(self) -> str:
        return str(self.amp_dtype or "fp32")

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def optimizer_step(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, grad_clip: float | None) -> None:
        """Unscale (fp16), clip, step: after the gradients of the whole accumulated batch are in."""
        if self.scaler:
            self.scaler.unscale_(optimizer)
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def parallel(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` wrapped in DDP when there are several processes."""
        if self.world == 1:
            return model
        ids = [self.device] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def gather(self, value: float) -> list[float]:
        """``value`` of every rank, in rank order."""
        if self.world == 1:
            return [value]
        mine = torch.tensor([value], dtype=torch.float64, device=self.device)
        every = [torch.empty_like(mine) for _ in range(self.world)]
        torch.distributed.all_gather(every, mine)
        return [float(v.item()) for v in every]

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


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
