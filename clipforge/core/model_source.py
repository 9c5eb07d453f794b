"""Where a model comes from: a registered model (``models:/NAME@champion``), a folder, a checkpoint.

Warm starts and distillation teachers name a model by URI; this turns the URI into a local
folder holding either an open_clip ``local-dir:`` model (``open_clip_config.json`` +
``open_clip_model.safetensors``) or a clipforge checkpoint (``model.safetensors``). Weights are
read with safetensors only: nothing is unpickled.
"""

from __future__ import annotations

from pathlib import Path

from clipforge.core.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from clipforge.core.errors import ConfigError

#: The pyfunc artifact that holds the open_clip folder (clipforge.registry.embedding_model).
OPEN_CLIP_ARTIFACT = "open_clip_model"
CHECKPOINT_WEIGHTS = "model.safetensors"


def fetch_model(uri: str, dest: str | Path, storage_options: dict | None = None) -> Path:
    """Copy the model at ``uri`` into the local folder ``dest`` (or return the folder itself when local).

    ``uri``: ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (the MLflow registry of the
    current tracking URI), ``local-dir:PATH``, or a folder path / ``s3://`` URI of an open_clip
    folder or of a clipforge checkpoint (``.../checkpoints/step-N``).
    """
    from clipforge.core.storage import Store

    if uri.startswith("models:/"):
        import mlflow

        try:
            path = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest))
        except Exception as e:  # MLflow raises several types for a missing model or alias
            raise ConfigError(f"{uri}: cannot fetch the registered model ({e})") from None
        folder = _pyfunc_artifact(Path(path), uri)
    else:
        uri = uri.removeprefix("local-dir:")
        store = Store(uri, storage_options)
        folder = Path(store.root) if store.local else store.get_dir("", dest)
    if not folder.is_dir() or not ((folder / CONFIG_NAME).is_file() or (folder / CHECKPOINT_WEIGHTS).is_file()):
        raise ConfigError(
            f"{uri}: not an open_clip model folder ({CONFIG_NAME} + {WEIGHTS_NAME}) "
            f"nor a clipforge checkpoint ({CHECKPOINT_WEIGHTS})"
        )
    return folder


def weights_file(folder: Path) -> Path:
    """The safetensors weights of a fetched model folder or checkpoint."""
    for name in (WEIGHTS_NAME, CHECKPOINT_WEIGHTS):
        if (folder / name).is_file():
            return folder / name
    raise ConfigError(f"{folder}: no {WEIGHTS_NAME} or {CHECKPOINT_WEIGHTS}")


def _pyfunc_artifact(model_dir: Path, uri: str) -> Path:
    """The open_clip folder a clipforge pyfunc carries as its artifact (clipforge.registry.pyfunc)."""
    import yaml

    spec = yaml.safe_load((model_dir / "MLmodel").read_text())
    artifacts = spec.get("flavors", {}).get("python_function", {}).get("artifacts", {})
    if OPEN_CLIP_ARTIFACT not in artifacts:
        raise ConfigError(f"{uri}: not a clipforge model (its pyfunc has no {OPEN_CLIP_ARTIFACT!r} artifact)")
    return model_dir / artifacts[OPEN_CLIP_ARTIFACT]["path"]
