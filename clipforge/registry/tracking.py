"""Everything clipforge says to MLflow about runs, experiments and the registry, in one module.

Where runs go (the tracking URI, experiments, the ``mlflow ui`` command), what a retrain logs (its
run, params, metrics, datasets, figures, the model) and the registry's versions and aliases
(:mod:`~clipforge.registry.promotion`). Every call goes through the retried client of
:mod:`~clipforge.registry.client`; calls that create something (a run, a model version) first look
for what an earlier attempt created, so that a retry never leaves a duplicate.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
from matplotlib.figure import Figure
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.models.model import ModelInfo
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

import clipforge
from clipforge.core.context import RunContext
from clipforge.core.evaluations import runs
from clipforge.core.metrics import EVAL_PREFIX, metric_key
from clipforge.core.recipe import Recipe
from clipforge.core.results import CurateResult
from clipforge.registry import promotion
from clipforge.registry.client import MAX_METRICS_PER_BATCH, mlflow_client, tracked
from clipforge.registry.model_card import summary as model_summary
from clipforge.registry.pyfunc import log_pyfunc_model

# -- where runs go ----------------------------------------------------------------------------


def default_tracking_uri(workdir: str | Path = ".") -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite file ``<workdir>/mlflow.db`` (absolute path)."""
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    return f"sqlite:///{(Path(workdir).expanduser().resolve() / 'mlflow.db').as_posix()}"


def tracking_uri() -> str:
    return str(mlflow.get_tracking_uri())


def use_tracking_uri(uri: str) -> None:
    """Send this process's runs and registry calls to ``uri`` from now on."""
    mlflow.set_tracking_uri(uri)


#: MLflow 3's UI opens an experiment without this tag in its GenAI view (traces, prompts, judges);
#: a retrain's experiment is model training.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = {EXPERIMENT_KIND_TAG: "custom_model_development"}


def ensure_experiment(name: str, artifact_root: str | None = None) -> str:
    """The id of experiment ``name``, created (or restored from deleted) when needed.

    A new experiment keeps its artifacts under ``<artifact_root>/<name>`` when ``artifact_root``
    is given (a local folder or a URI such as ``s3://bucket/prefix``), so that a local SQLite
    store keeps its artifacts beside it instead of in the current directory. An existing
    experiment keeps its artifact location.
    """
    client = mlflow_client()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = f"{_as_uri(artifact_root).rstrip('/')}/{name}" if artifact_root else None
        try:
            return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
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
    if not experiment.tags.get(EXPERIMENT_KIND_TAG):  # one an earlier clipforge made
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND[EXPERIMENT_KIND_TAG])
    return experiment.experiment_id


def log_active_run_metrics(metrics: dict[str, float], step: int | None = None, run_id: str | None = None) -> None:
    """Log ``metrics`` to ``run_id`` (default: the active run) in batches, names through :func:`metric_key`."""
    if run_id is None:
        run = mlflow.active_run()
        if run is None:
            raise RuntimeError("log_active_run_metrics: no run_id given and no active MLflow run")
        run_id = run.info.run_id
    timestamp = int(time.time() * 1000)
    entries = [Metric(metric_key(k), float(v), timestamp, step or 0) for k, v in metrics.items()]
    client = mlflow_client()
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


# Recipe fields that may carry secrets never become MLflow params.
_PRIVATE = ("storage.options",)


def flat_params(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if any(path == p or path.startswith(p + ".") for p in _PRIVATE):
            continue
        if isinstance(value, dict):
            out.update(flat_params(value, path + "."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, v in enumerate(value):
                out.update(flat_params(v, f"{path}.{i}."))
        else:
            out[path] = str(value)[:6000]
    return out


# -- the run ----------------------------------------------------------------------------------


def mlflow_run(ctx: RunContext, artifact_root: str | None = None) -> str:
    """The retrain's MLflow run id, creating the run (tags, params, recipe) the first time."""
    if ctx.mlflow_run_id:
        return ctx.mlflow_run_id
    ctx.mlflow_run_id = create_run(ctx, artifact_root)
    ctx.save_state()
    return ctx.mlflow_run_id


@tracked
def create_run(ctx: RunContext, artifact_root: str | None = None) -> str:
    from prefect.runtime import flow_run

    experiment_id = ensure_experiment(ctx.recipe.name, artifact_root)
    from mlflow.tracking.context.registry import resolve_tags

    # MLflow's own tags first ("Created by", "Source", the git commit), as mlflow.start_run sets them
    tags = {
        **resolve_tags(),
        "clipforge.run_id": ctx.run_id,
        "clipforge.version": clipforge.__version__,
        "clipforge.recipe_hash": ctx.recipe.digest(),
        "clipforge.storage": ctx.store.url,
        "mlflow.runName": ctx.run_id,
        MLFLOW_RUN_NOTE: run_description(ctx),
    }
    if flow_run.id:
        tags["prefect.flow_run_id"] = str(flow_run.id)
    client = mlflow_client()
    # a retry after a partial success (or a crash before run.json was saved) finds the run it created
    earlier = client.search_runs([experiment_id], f"tags.`clipforge.run_id` = '{ctx.run_id}'", max_results=1)
    run = earlier[0] if earlier else client.create_run(experiment_id, run_name=ctx.run_id, tags=tags)
    items = [Param(k, v) for k, v in flat_params(ctx.recipe.as_dict()).items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    client.log_text(run.info.run_id, ctx.recipe.to_yaml(), "recipe.yaml")
    return str(run.info.run_id)


def run_description(ctx: RunContext) -> str:
    """The run's description in the MLflow UI: the model card's summary, and where the run lives."""
    return (
        f"{model_summary(ctx.recipe.to_yaml())}\n\nRetrain `{ctx.run_id}` by clipforge {clipforge.__version__}; "
        f"its files are under `{ctx.store.uri(ctx.run_dir)}`; registers `{ctx.recipe.model_name}`."
    )


@tracked
def mark_running(run_id: str) -> None:
    client = mlflow_client()
    if client.get_run(run_id).info.status != "RUNNING":
        client.update_run(run_id, status="RUNNING")


ERROR_TAG, RESUMED_TAG = "clipforge.error", "clipforge.resumed_after"


@tracked
def finish_run(run_id: str, error: BaseException | None = None, error_text: str = "") -> None:
    """Mark the run FAILED with the error as a tag and its traceback as ``error.txt``, or FINISHED.

    A run resumed to success after a failure says so: the error tag moves to
    ``clipforge.resumed_after`` and ``error.txt`` becomes a note of the earlier failure.
    """
    client = mlflow_client()
    if error is not None:
        client.set_tag(run_id, ERROR_TAG, f"{type(error).__name__}: {error}"[:5000])
        client.log_text(run_id, error_text, "error.txt")
        client.set_terminated(run_id, status="FAILED")
        return
    earlier = client.get_run(run_id).data.tags.get(ERROR_TAG)
    if earlier:  # the tag goes last, so that a retry of this call still finds it
        note = f"This run failed earlier, with\n\n    {earlier}\n\nIt was resumed from where it stopped and finished.\n"
        client.log_text(run_id, note, "error.txt")
        client.set_tag(run_id, RESUMED_TAG, earlier)
        client.delete_tag(run_id, ERROR_TAG)
    client.set_terminated(run_id, status="FINISHED")


@tracked
def run_tags(run_id: str) -> dict[str, str]:
    return dict(mlflow_client().get_run(run_id).data.tags)


@tracked
def run_metrics(run_id: str, prefix: str = "") -> dict[str, float]:
    """The latest value of each of a run's metrics whose name starts with ``prefix``."""
    return {k: v for k, v in mlflow_client().get_run(run_id).data.metrics.items() if k.startswith(prefix)}


@tracked
def experiment_of(run_id: str) -> str:
    return str(mlflow_client().get_run(run_id).info.experiment_id)


@tracked
def set_tags(run_id: str, tags: dict[str, str]) -> None:
    client = mlflow_client()
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


@tracked
def log_metrics(run_id: str, metrics: dict[str, float]) -> None:
    log_active_run_metrics(metrics, run_id=run_id)


@tracked
def log_params(run_id: str, params: dict[str, str]) -> None:
    if params:
        mlflow_client().log_batch(run_id, params=[Param(k, v) for k, v in params.items()])


# -- the data a run used, as MLflow datasets -----------------------------------------------------

#: MLflow keeps a dataset's digest in 36 characters: the content hash's first 32 hex digits.
DIGEST_CHARS = 32


@tracked
def log_curated_data(run_id: str, curated: CurateResult, columns: dict[str, str]) -> None:
    """The curated data as the run's training dataset: its manifest as source, its content hash as
    digest, ``columns`` (the manifest's, name -> MLflow type) as schema, kept and dropped as profile."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.types import ColSpec, Schema

    with warnings.catch_warnings():  # MLflow registers two equal sources for local paths and says so each time
        warnings.filterwarnings("ignore", "The specified dataset source can be interpreted in multiple ways")
        source = resolve_dataset_source(curated.manifest_uri)
    profile = {
        "pairs": curated.input, "kept": curated.kept, "dropped": curated.input - curated.kept, "shards": len(curated.shards),
        "steps": {step: {"kept": c.kept, "dropped": c.dropped, **({"reasons": c.reasons} if c.reasons else {})}
                  for step, c in curated.funnel.items()},
    }  # fmt: skip
    schema = Schema([ColSpec(kind, name) for name, kind in columns.items()]) if columns else None
    dataset = Dataset(
        name=f"curated-{curated.out.rsplit('/', 1)[-1]}",
        digest=curated.content_hash[:DIGEST_CHARS],
        source_type=source._get_source_type(),
        source=source.to_json(),
        schema=json.dumps({"mlflow_colspec": schema.to_dict()}) if schema else None,
        profile=json.dumps(profile),
    )
    log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", "training")])])


def log_inputs(run_id: str, inputs: list[DatasetInput]) -> None:
    """``log_inputs``, once more when it lost a race: two runs of one experiment logging the same
    dataset at once both insert it, and the database refuses the second (an integrity error); the
    next attempt finds the first one's row and links it."""
    try:
        mlflow_client().log_inputs(run_id, inputs)
    except MlflowException as e:
        if not _lost_insert_race(e):
            raise
        mlflow_client().log_inputs(run_id, inputs)


def _lost_insert_race(e: BaseException) -> bool:
    import sqlite3

    from sqlalchemy.exc import IntegrityError

    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, IntegrityError | sqlite3.IntegrityError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def evaluation_datasets(recipe: Recipe) -> list[tuple[Dataset, list[str]]]:
    """Each dataset the recipe's evaluators read, as an MLflow dataset, with the labels of the
    evaluations that read it (``[<set>/]<evaluator>``). These are made by dataset plugins from their
    recipe entry: the entry is the source, its hash the digest, and the evaluators the profile."""
    from mlflow.data.code_dataset_source import CodeDatasetSource

    readers: dict[str, tuple[str, list[str]]] = {}
    for _, ev, set_name, ref in runs(recipe):
        key = json.dumps(ref.entry(), sort_keys=True, default=str)
        name = f"eval-{set_name}" if set_name else f"eval-{ref.type}"
        readers.setdefault(key, (name, []))[1].append(f"{set_name}/{ev.label}" if set_name else ev.label)
    datasets = []
    for key, (name, labels) in readers.items():
        source = CodeDatasetSource({"clipforge.dataset": key})
        dataset = Dataset(
            name=name,
            digest=hashlib.sha256(key.encode()).hexdigest()[:DIGEST_CHARS],
            source_type=source._get_source_type(),
            source=source.to_json(),
            profile=json.dumps({"evaluators": labels}),
        )
        datasets.append((dataset, labels))
    return datasets


@tracked
def log_evaluation_sets(run_id: str, recipe: Recipe) -> None:
    """The evaluation datasets (:func:`evaluation_datasets`) as the run's inputs."""
    inputs = [DatasetInput(d, [InputTag("mlflow.data.context", "evaluation")]) for d, _ in evaluation_datasets(recipe)]
    if inputs:
        log_inputs(run_id, inputs)


@tracked
def log_model_metrics(run_id: str, model_id: str, recipe: Recipe, metrics: dict[str, float]) -> None:
    """The evaluation's metrics as the logged model's, each with the dataset it was measured on, so
    that the model's page lists the data it was evaluated on ("Datasets used")."""
    read_by = {f"{EVAL_PREFIX}{label}/": dataset for dataset, labels in evaluation_datasets(recipe) for label in labels}
    now = int(time.time() * 1000)
    batch = [
        Metric(
            metric_key(key),
            float(value),
            now,
            0,
            run_id=run_id,
            model_id=model_id,
            dataset_name=d.name,
            dataset_digest=d.digest,
        )
        for key, value in sorted(metrics.items())
        for prefix, d in read_by.items()
        if key.startswith(prefix)
    ]
    if batch:
        mlflow_client().log_batch(run_id, metrics=batch)


@tracked
def log_dict(run_id: str, obj: Any, path: str) -> None:
    mlflow_client().log_dict(run_id, obj, path)


@tracked
def log_text(run_id: str, text: str, path: str) -> None:
    mlflow_client().log_text(run_id, text, path)


@tracked
def log_artifacts(run_id: str, folder: Path, path: str) -> None:
    """A local folder as the run's artifacts under ``path`` (the trained adapter, in its own format)."""
    mlflow_client().log_artifacts(run_id, str(folder), path)


@tracked
def log_figure(run_id: str, fig: Figure, path: str) -> None:
    """Log a matplotlib figure as a PNG artifact."""
    mlflow_client().log_figure(run_id, fig, path)


@tracked
def log_model(run_id: str, model_dir: Path, card: str, step: int) -> ModelInfo:
    """Log the open_clip folder, the model card and the pyfunc model in the run; return the logged model.

    ``step``: the training step the weights are from. MLflow copies the run's metrics of that step to
    the logged model (the final training loss), without their datasets: the evaluation's are given
    to it with theirs (:func:`log_model_metrics`)."""
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
        (Path(tmp) / "MODEL_CARD.md").write_text(card)
        mlflow.log_artifacts(str(model_dir), "open_clip_model")
        mlflow.log_artifact(str(Path(tmp) / "MODEL_CARD.md"))
        return log_pyfunc_model(model_dir, name="model", step=step)


class StepLogger:
    """Sends each step's metrics to MLflow in batches, not one call a step.

    The batches are logged in the background (MLflow's asynchronous logging), so that a slow
    tracking server never holds up training; :meth:`close` waits until all of them are stored.
    """

    def __init__(self, run_id: str, every: int) -> None:
        self.run_id, self.every = run_id, every
        self.pending: list[tuple[int, dict[str, float]]] = []
        self.client = mlflow_client()
        self.operations: list[Any] = []

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        self.pending.append((step, metrics))
        if len(self.pending) >= self.every:
            self.flush()

    def flush(self) -> None:
        items = [
            Metric(metric_key(f"train/{k}"), float(v), 0, step) for step, metrics in self.pending for k, v in metrics.items()
        ]
        for i in range(0, len(items), MAX_METRICS_PER_BATCH):
            batch = items[i : i + MAX_METRICS_PER_BATCH]
            self.operations.append(self.client.log_batch(self.run_id, metrics=batch, synchronous=False))
        self.pending.clear()

    def close(self) -> None:
        """Send what is pending and wait until MLflow stored every batch (raising what failed)."""
        self.flush()
        for operation in self.operations:
            operation.wait()
        self.operations.clear()


@dataclass(frozen=True)
class StepLog:
    """A :class:`StepLogger` for run ``run_id`` of ``tracking_uri``, made where training runs:
    picklable, it travels in the train job to each process; the client does not."""

    tracking_uri: str
    run_id: str

    def __call__(self, every: int) -> StepLogger:
        use_tracking_uri(self.tracking_uri)
        return StepLogger(self.run_id, every)


# -- the registry ------------------------------------------------------------------------------

# the flows' promotion operations, each retried as a whole (see registry.promotion)
register_version = promotion.register_version
promote_if_better = promotion.promote_if_better
promote_first_version = promotion.promote_first_version
set_champion = promotion.set_champion
champion_version = promotion.champion_version
champion_metrics = promotion.champion_metrics
judge_promotion = promotion.judge_promotion


@tracked
def tag_version(name: str, version: str, tags: dict[str, str]) -> None:
    client = mlflow_client()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


@tracked
def link_logged_model(model_id: str, name: str, version: str) -> None:
    """Record on the logged model that it became ``name`` version ``version``, as ``mlflow.register_model``
    does: the ``mlflow.modelVersions`` tag is what the MLflow UI reads to show a logged model's versions
    (the registry's SQL store keeps no model id on a version)."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    client = mlflow_client()
    known = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
    entry = {"name": name, "version": int(version)}
    if entry not in known:  # a retried call adds it once
        client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([*known, entry])})


@tracked
def describe_model(name: str, description: str) -> None:
    """The registered model's description, unless someone wrote one already."""
    client = mlflow_client()
    if not client.get_registered_model(name).description:
        client.update_registered_model(name, description=description)


@tracked
def describe_version(name: str, version: str, description: str) -> None:
    mlflow_client().update_model_version(name, version, description=description)


@tracked
def run_params(run_id: str) -> dict[str, str]:
    return dict(mlflow_client().get_run(run_id).data.params)


@tracked
def version_run(name: str, version: str) -> str | None:
    return mlflow_client().get_model_version(name, version).run_id or None


@tracked
def version_tags(name: str, version: str) -> dict[str, str]:
    return dict(mlflow_client().get_model_version(name, version).tags)


@tracked
def champion_lineage(name: str) -> tuple[str, dict[str, str]] | None:
    """The champion of ``name`` and its version's tags (the lineage ``clipforge.*`` ones lead to the
    data it was trained on); None without a champion."""
    version = champion_version(name)
    if version is None:
        return None
    return version, dict(mlflow_client().get_model_version(name, version).tags)


def champion_manifest(name: str) -> str | None:
    """The manifest URI of the curated data the champion of ``name`` was trained on (its version's
    ``clipforge.manifest_uri`` lineage tag); None without a champion or such a tag."""
    lineage = champion_lineage(name)
    return (lineage[1].get("clipforge.manifest_uri") or None) if lineage else None
