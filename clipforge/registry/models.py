"""Fetch the open_clip ``local-dir:`` folder of a registered or logged model, or of a checkpoint."""

from __future__ import annotations

from pathlib import Path

import mlflow
import yaml
from mlflow.exceptions import MlflowException

from clipforge.core.checkpoint import CONFIG_NAME
from clipforge.core.errors import ConfigError
from clipforge.core.storage import Store
from clipforge.registry.embedding_model import OPEN_CLIP_ARTIFACT

#: URI schemes MLflow resolves: registered versions and aliases, logged models, run artifacts.
MLFLOW_SCHEMES = ("models:/", "runs:/")


def fetch_open_clip_dir(uri: str, dst: str | Path, storage_options: dict | None = None) -> Path:
    """A local open_clip folder for ``uri``, downloaded under ``dst`` when it is not local.

    ``uri`` is ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or ``runs:/...`` (a clipforge
    pyfunc: its ``open_clip_model`` artifact), an open_clip folder (a path, ``local-dir:PATH``)
    or a folder on a store (``s3://bucket/runs/<id>/train/model``, opened with
    ``storage_options``). A URI that names nothing is a :class:`ConfigError`.
    """
    dst = Path(dst)
    if uri.startswith(MLFLOW_SCHEMES):
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
        except MlflowException as e:
            raise ConfigError(f"{uri}: cannot fetch the model from MLflow ({mlflow.get_tracking_uri()}): {e.message}") from e
        return _open_clip_artifact(local, uri)
    path = uri.removeprefix("local-dir:")
    store = Store(path, storage_options)
    if store.local:
        folder = Path(store.root)
        if not (folder / CONFIG_NAME).is_file():
            raise ConfigError(f"{uri}: not an open_clip model folder ({CONFIG_NAME} is missing)")
        return folder
    if not store.exists(CONFIG_NAME):
        raise ConfigError(f"{uri}: not an open_clip model folder ({CONFIG_NAME} is missing)")
    return store.get_dir("", dst / "open_clip_model")


def _open_clip_artifact(local: Path, uri: str) -> Path:
    """The open_clip folder inside a downloaded pyfunc model (where its ``MLmodel`` says it is)."""
    if (local / CONFIG_NAME).is_file():  # the URI named the folder itself
        return local
    mlmodel = local / "MLmodel"
    if not mlmodel.is_file():
        raise ConfigError(f"{uri}: neither an MLflow model nor an open_clip model folder")
    flavor = (yaml.safe_load(mlmodel.read_text()).get("flavors") or {}).get("python_function") or {}
    artifact = (flavor.get("artifacts") or {}).get(OPEN_CLIP_ARTIFACT)
    if not artifact:
        raise ConfigError(f"{uri}: the model has no {OPEN_CLIP_ARTIFACT!r} artifact; is it a clipforge model?")
    folder = local / artifact["path"]
    if not (folder / CONFIG_NAME).is_file():
        raise ConfigError(f"{uri}: its {OPEN_CLIP_ARTIFACT!r} artifact holds no {CONFIG_NAME}")
    return folder
