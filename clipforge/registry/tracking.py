"""Where runs go and how metrics get there: tracking URI, experiments, metric names, the UI command."""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path
from urllib.parse import urlparse

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

from clipforge.core.metrics import metric_key

#: MLflow refuses more than this many metrics in one ``log_batch`` call.
MAX_METRICS_PER_BATCH = 1000


def default_tracking_uri(workdir: str | Path = ".") -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite file ``<workdir>/mlflow.db`` (absolute path)."""
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    return f"sqlite:///{(Path(workdir).expanduser().resolve() / 'mlflow.db').as_posix()}"


def ensure_experiment(name: str, artifact_root: str | None = None) -> str:
    """The id of experiment ``name``, created (or restored from deleted) when needed.

    A new experiment keeps its artifacts under ``<artifact_root>/<name>`` when ``artifact_root``
    is given (a local folder or a URI such as ``s3://bucket/prefix``), so that a local SQLite
    store keeps its artifacts beside it instead of in the current directory. An existing
    experiment keeps its artifact location.
    """
    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = f"{_as_uri(artifact_root).rstrip('/')}/{name}" if artifact_root else None
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException as e:
            # another process created it between our lookup and our create
            if e.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        # MLflow refuses to create an experiment whose name a deleted one still holds
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def log_metrics(metrics: dict[str, float], step: int | None = None, run_id: str | None = None) -> None:
    """Log ``metrics`` to ``run_id`` (default: the active run) in batches, names through :func:`metric_key`."""
    if run_id is None:
        run = mlflow.active_run()
        if run is None:
            raise RuntimeError("log_metrics: no run_id given and no active MLflow run")
        run_id = run.info.run_id
    timestamp = int(time.time() * 1000)
    entries = [Metric(metric_key(k), float(v), timestamp, step or 0) for k, v in metrics.items()]
    client = MlflowClient()
    for start in range(0, len(entries), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=entries[start : start + MAX_METRICS_PER_BATCH], synchronous=True)


def mlflow_ui_command(tracking_uri: str) -> str:
    """What a user runs (or opens) to browse the runs and models at ``tracking_uri``."""
    scheme = urlparse(tracking_uri).scheme
    if scheme in ("http", "https"):
        return f"open {tracking_uri} in a browser"
    if scheme == "databricks":
        return "open the Experiments page of your Databricks workspace"
    return f"mlflow ui --backend-store-uri {shlex.quote(tracking_uri)}"


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The address of a run's page: on the tracking server, else where ``mlflow ui`` serves it by default."""
    base = tracking_uri.rstrip("/") if urlparse(tracking_uri).scheme in ("http", "https") else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def _as_uri(location: str) -> str:
    """A local folder as an absolute ``file://`` URI; a URI with a scheme unchanged."""
    if len(urlparse(location).scheme) > 1:  # one letter is a Windows drive, not a scheme
        return location
    return Path(location).expanduser().resolve().as_uri()
