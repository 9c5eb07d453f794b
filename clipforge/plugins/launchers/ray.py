"""``ray``: the training on a Ray cluster (KubeRay, Ray on VMs) with Ray Train's ``TorchTrainer``:
the way to train on several machines.

The cluster is the one at ``address`` (default: ``RAY_ADDRESS``), or a local Ray runtime started
for the run when none is set. Ray Train starts the workers, sets up their process group and
tells each its rank; the workers run clipforge's engine, which writes checkpoints and the model to
clipforge's store (S3 for a real cluster: every machine must reach it), so Ray's own
checkpointing is not used. Ray is an optional extra: ``pip install 'clipforge[ray]'``.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

import clipforge


class RayParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_workers: int = Field(2, ge=1, description="training processes, one per GPU with use_gpu")
    use_gpu: bool | None = Field(
        None, description="one GPU per worker; default: when train.device is cuda, or auto on a cluster with GPUs"
    )
    resources_per_worker: dict[str, float] | None = Field(None, description="Ray resources of each worker, e.g. {CPU: 4, GPU: 1}")
    address: str | None = Field(None, description="the Ray cluster; default RAY_ADDRESS, else a local runtime for the run")


class RayLauncher:
    """Ray Train's TorchTrainer on a Ray cluster, or on a local runtime."""

    def __init__(
        self,
        num_workers: int = 2,
        use_gpu: bool | None = None,
        resources_per_worker: dict[str, float] | None = None,
        address: str | None = None,
    ) -> None:
        self.num_workers, self.use_gpu, self.resources_per_worker = num_workers, use_gpu, resources_per_worker
        self.address = address

    def launch(self, job: Callable[[], object], device: str) -> None:
        ray, train, torch_train = _import_ray()
        started = _connect(ray, self.address or os.environ.get("RAY_ADDRESS"), self.num_workers)
        try:
            use_gpu = self.use_gpu if self.use_gpu is not None else _wants_gpu(ray, device)
            with tempfile.TemporaryDirectory(prefix="clipforge-ray-") as tmp:
                trainer = torch_train.TorchTrainer(
                    _run,
                    train_loop_config={"job": job},
                    scaling_config=train.ScalingConfig(
                        num_workers=self.num_workers, use_gpu=use_gpu, resources_per_worker=self.resources_per_worker
                    ),
                    run_config=train.RunConfig(storage_path=tmp, failure_config=train.FailureConfig(max_failures=0)),
                )
                try:
                    trainer.fit()
                except train.TrainingFailedError as e:
                    raise clipforge.StageError(_failure(e, self.num_workers)) from None
        finally:
            if started:
                ray.shutdown()


def _import_ray() -> tuple[Any, Any, Any]:
    try:
        import ray
        import ray.train
        import ray.train.torch
    except ImportError:
        raise clipforge.ConfigError("train.launcher: the ray launcher needs Ray Train: pip install 'clipforge[ray]'") from None
    return ray, ray.train, ray.train.torch


def _connect(ray: Any, address: str | None, workers: int) -> bool:
    """Join the cluster at ``address``, or start a local runtime; True when this run started it."""
    if ray.is_initialized():
        return False
    try:
        if address:
            _reachable(address)  # Ray itself would wait minutes for an address that never answers
            ray.init(address=address, include_dashboard=False)
        else:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            ray.init(num_cpus=max(cores, workers + 1), include_dashboard=False, log_to_driver=False)
    except Exception as e:  # Ray raises ConnectionError, RuntimeError or its own types
        where = f"the Ray cluster at {address}" if address else "a local Ray runtime"
        raise clipforge.StageError(f"train.launcher: cannot reach {where}: {type(e).__name__}: {e}") from None
    return True


def _reachable(address: str, timeout_s: float = 10.0) -> None:
    """Raise ConnectionError when nothing listens at a ``host:port`` or ``ray://host:port`` address."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():  # "auto", or a name Ray resolves itself
        return
    with socket.create_connection((host, int(port)), timeout=timeout_s):
        pass


def _wants_gpu(ray: Any, device: str) -> bool:
    if device.startswith("cuda"):
        return True
    return device == "auto" and ray.cluster_resources().get("GPU", 0) > 0


def _failure(error: Exception, workers: int) -> str:
    """Which rank failed and why, from Ray Train's error."""
    failures = getattr(error, "worker_failures", None) or {}
    if failures:
        rank = min(failures)
        cause = failures[rank]
        return (
            f"train: rank {rank} of {workers} failed: {type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else ''}"
            "; run again with the same --run-id to resume from the latest checkpoint"
        )
    return f"train: the Ray training failed: {str(error).strip().splitlines()[-1]}"


def _run(config: dict[str, Any]) -> None:
    """Each Ray Train worker: the process group and the rank variables are set; run the job."""
    config["job"]()


@clipforge.hookimpl
def register_launchers(register):
    register(
        "ray",
        RayLauncher,
        params=RayParams,
        description="Ray Train's TorchTrainer on a Ray cluster (RAY_ADDRESS) or a local runtime: several machines",
    )
