"""``torchrun``: the training on several processes of this machine, through PyTorch's elastic launcher.

The API behind the ``torchrun`` command (``torch.distributed.launcher.api.elastic_launch``),
not a shell string: processes are spawned with a standalone rendezvous on a free port, each told
its rank in the environment; a failed rank is reported with its error, and with ``max_restarts``
every process is started again, the training resuming from its latest checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

import clipforge


class TorchrunParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    nproc_per_node: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="processes on this machine; auto: one per GPU (one on a machine without GPUs)"
    )
    max_restarts: int = Field(
        0, ge=0, description="restarts of every process after a failure, each resuming from the latest checkpoint"
    )


class Torchrun:
    """Several processes on this machine, one per GPU by default, with PyTorch's elastic launcher."""

    def __init__(self, nproc_per_node: int | Literal["auto"] = "auto", max_restarts: int = 0) -> None:
        self.nproc_per_node, self.max_restarts = nproc_per_node, max_restarts

    def processes(self, device: str) -> int:
        """How many processes to start for training on ``device`` (the recipe's train.device)."""
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        on_gpus = device.startswith("cuda") or (device == "auto" and gpus > 0)
        if self.nproc_per_node == "auto":
            return max(gpus, 1) if on_gpus else 1
        if on_gpus and self.nproc_per_node > gpus:
            raise clipforge.ConfigError(
                f"train.launcher.nproc_per_node: {self.nproc_per_node} processes, but this machine has {gpus} GPU(s)"
            )
        return int(self.nproc_per_node)

    def launch(self, job: Callable[[], object], device: str) -> None:
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.launcher.api import LaunchConfig, elastic_launch

        nproc = self.processes(device)
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=nproc,
            run_id=str(uuid.uuid4()),
            rdzv_backend="c10d",
            rdzv_endpoint="localhost:0",  # a free port, as torchrun --standalone
            max_restarts=self.max_restarts,
            monitor_interval=0.5,
        )
        try:
            with _threads_per_process(nproc):
                elastic_launch(config, _run)(job)
        except ChildFailedError as e:
            rank, failure = e.get_first_failure()
            raise clipforge.StageError(
                f"train: rank {rank} of {nproc} failed (exit code {failure.exitcode}): {_first_line(failure.message)}"
                + (f" after {self.max_restarts} restart(s)" if self.max_restarts else "")
                + "; run again with the same --run-id to resume from the latest checkpoint"
            ) from None


@contextlib.contextmanager
def _threads_per_process(nproc: int) -> Iterator[None]:
    """As torchrun: the processes share the cores (OMP_NUM_THREADS, unless it is set)."""
    if "OMP_NUM_THREADS" in os.environ or nproc == 1:
        yield
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ["OMP_NUM_THREADS"] = str(max(1, cores // nproc))
    try:
        yield
    finally:
        del os.environ["OMP_NUM_THREADS"]


def _first_line(message: str | dict[str, Any]) -> str:
    """The error's first line: the agent reads ``{"message": ..., "extraInfo": ...}`` back from a process that recorded it."""
    text = str(message.get("message", "") if isinstance(message, dict) else message).strip()
    return text.splitlines()[0] if text else "no message"


def _run(job: Callable[[], object]) -> None:
    """What each spawned process runs (importable: the processes are spawned, not forked)."""
    from torch.distributed.elastic.multiprocessing.errors import record

    record(job)()  # writes the exception to the error file the agent reads back


@clipforge.hookimpl
def register_launchers(register):
    register(
        "torchrun",
        Torchrun,
        params=TorchrunParams,
        description="several processes on this machine, PyTorch's elastic launcher (torchrun)",
    )
