"""One place that knows every way to name a model, and turns each into an open_clip folder here.

What open_clip's ``parse_model_name`` is to its schemes, :func:`resolve_model` is to clipforge's:

===========================  ================================================================
``models:/NAME@ALIAS``       a registered model's alias, pinned to the version it points at now
``models:/NAME/VERSION``     a registered model version
``models:/m-<id>``           a logged model (MLflow 3)
``runs:/RUN_ID/PATH``        a run's artifact holding a model
``hf-hub:ORG/NAME[@REV]``    open_clip's scheme for a Hugging Face hub model, pinned to its commit
``local-dir:PATH``           open_clip's scheme for an exported folder
``PATH``, ``s3://...``       an exported folder or a training checkpoint, on the disk or a store
``ViT-B-32``                 an open_clip config name: an architecture, without weights
===========================  ================================================================

An exported folder holds ``open_clip_config.json`` and ``open_clip_model.safetensors``; a
training checkpoint (``.../checkpoints/step-N``) holds ``model.safetensors`` and, since this
version, the config in its ``state.json``. Every caller (warm starts, distillation teachers, scoring models of
curation steps, ``clipforge evaluate``) goes through here, so each accepts every scheme.
Downloads are made once per process and removed when it exits; weights are read with
safetensors only. Hub models come through huggingface_hub's own cache (``HF_HOME``, ``HF_HUB_CACHE``);
with ``HF_HUB_OFFLINE=1`` only from it.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from clipforge.core.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_open_clip_dir
from clipforge.core.errors import ConfigError
from clipforge.core.storage import Store

if TYPE_CHECKING:
    import torch

    from clipforge.core.components import EncoderBundle

#: The weights of a training checkpoint, and its metadata (which holds the open_clip config).
CHECKPOINT_WEIGHTS = "model.safetensors"
CHECKPOINT_STATE = "state.json"
MLFLOW_SCHEMES = ("models:/", "runs:/")
HF_HUB = "hf-hub:"
ModelKind = Literal["registered", "logged", "run", "hub", "folder", "checkpoint", "config"]


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference made local.

    ``pinned`` names the same weights later (an alias becomes its version: what a resumed run
    records); ``folder`` is a local folder with the weights (None for a config name);
    ``config`` the open_clip ``model_cfg`` when known (a checkpoint of an older version has none).
    """

    ref: str
    pinned: str
    kind: ModelKind
    folder: Path | None
    config: dict[str, Any] | None

    @property
    def weights(self) -> Path | None:
        if self.folder is None:
            return None
        return next((self.folder / n for n in (WEIGHTS_NAME, CHECKPOINT_WEIGHTS) if (self.folder / n).is_file()), None)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The model's weights, read with safetensors (nothing is unpickled)."""
        from safetensors.torch import load as load_safetensors

        if self.weights is None:
            raise ConfigError(f"{self.ref}: an open_clip architecture name has no weights; give a trained model")
        return load_safetensors(self.weights.read_bytes())

    def load(self, device: str = "cpu") -> EncoderBundle:
        """The model as an :class:`~clipforge.EncoderBundle`, through open_clip's ``local-dir:`` loader."""
        if self.folder is None or self.config is None:
            what = "an architecture name without weights" if self.folder is None else f"a checkpoint without {CONFIG_NAME}"
            raise ConfigError(f"{self.ref}: {what}; give an exported model folder or a registered model")
        return load_open_clip_dir(self.folder, device=device)


def resolve_model(ref: str, storage_options: dict[str, Any] | None = None) -> ResolvedModel:
    """Resolve ``ref`` (see the module docstring); a reference that names no model is a :class:`ConfigError`.

    ``storage_options`` open store URIs (``s3://``), as the recipe's ``storage.options``.
    """
    if not isinstance(ref, str) or not ref.strip():
        raise ConfigError(f"{ref!r} is not a model reference")
    if ref.startswith(HF_HUB):
        pinned, snapshot = _hub_snapshot(ref)
        return _described(ref, pinned, "hub", snapshot)
    pinned = pin_model(ref)
    if pinned.startswith(MLFLOW_SCHEMES):
        kind: ModelKind = "run" if pinned.startswith("runs:/") else "logged" if pinned.startswith("models:/m-") else "registered"
        return _described(ref, pinned, kind, _downloaded(pinned, {"registry": _registry_uri()}, lambda: _from_mlflow(pinned)))
    path = pinned.removeprefix("local-dir:")
    if _is_config_name(path):
        import open_clip

        return ResolvedModel(ref, pinned, "config", None, open_clip.get_model_config(path))
    try:
        store = Store(path, storage_options)
    except (ValueError, ImportError) as e:  # fsspec: an unknown protocol
        raise ConfigError(f"{ref}: not a model reference clipforge knows ({e})") from None
    if not (store.exists(CONFIG_NAME) or store.exists(CHECKPOINT_WEIGHTS)):
        raise ConfigError(
            f"{ref}: not a registered model (models:/NAME@ALIAS, models:/NAME/VERSION), not an open_clip model folder "
            f"({CONFIG_NAME} + {WEIGHTS_NAME}) and not a training checkpoint ({CHECKPOINT_WEIGHTS})"
        )
    folder = (
        Path(store.root) if store.local else _downloaded(store.url, storage_options, lambda: store.get_dir("", _download_dir()))
    )
    return _described(ref, pinned, "folder" if (folder / WEIGHTS_NAME).is_file() else "checkpoint", folder)


def pin_model(ref: str) -> str:
    """``models:/NAME@ALIAS`` as ``models:/NAME/VERSION`` (the version it points at now), ``hf-hub:ORG/NAME[@REV]``
    as ``hf-hub:ORG/NAME@COMMIT``; any other reference as it is."""
    if ref.startswith(HF_HUB):
        return _hub_snapshot(ref)[0]
    if not ref.startswith("models:/") or "@" not in ref:
        return ref
    from mlflow import MlflowClient

    name, alias = ref.removeprefix("models:/").split("@", 1)
    try:
        version = MlflowClient().get_model_version_by_alias(name, alias).version
    except Exception as e:  # MLflow raises RestException or MlflowException, by store
        raise ConfigError(f"{ref}: no such registered model alias ({e})") from None
    return f"models:/{name}/{version}"


def hub_cache() -> Path:
    """The Hugging Face cache, as the environment names it now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path(constants.HF_HUB_CACHE)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _hub_snapshot(ref: str) -> tuple[str, Path]:
    """``hf-hub:ORG/NAME[@REVISION]`` as (its pinned form ``hf-hub:ORG/NAME@COMMIT``, the snapshot folder),
    found by huggingface_hub in its cache (and, unless offline, on the hub)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    repo, _, revision = ref.removeprefix(HF_HUB).partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ConfigError(f"{ref}: a hub model is hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION")
    cache, offline = hub_cache(), _hub_offline()
    try:
        folder = Path(snapshot_download(repo, revision=revision or None, cache_dir=cache, local_files_only=offline))
    except (LocalEntryNotFoundError, FileNotFoundError):
        cached = cache / f"models--{repo.replace('/', '--')}"
        if cached.is_dir():
            refs = sorted(p.name for p in (cached / "refs").glob("*")) if (cached / "refs").is_dir() else []
            commits = sorted(p.name for p in (cached / "snapshots").glob("*")) if (cached / "snapshots").is_dir() else []
            raise ConfigError(
                f"{ref}: no revision {revision or 'main'!r} of {repo} in the Hugging Face cache {cache} "
                f"(it holds refs: {', '.join(refs) or 'none'}; commits: {', '.join(commits) or 'none'})"
            ) from None
        why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
        raise ConfigError(
            f"{ref}: {repo} is not in the Hugging Face cache {cache} and {why}; fill the cache where the hub is "
            f"reachable (HF_HOME=... hf download {repo}{f' --revision {revision}' if revision else ''}) and copy it here"
        ) from None
    except RevisionNotFoundError:
        raise ConfigError(f"{ref}: {repo} has no revision {revision!r} on the hub") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{ref}: no model {repo} on the hub (or it is private: set HF_TOKEN)") from None
    except HfHubHTTPError as e:
        raise ConfigError(f"{ref}: the hub refused {repo}: {e}") from None
    if not (folder / CONFIG_NAME).is_file():
        raise ConfigError(f"{ref}: {repo} is not an open_clip model (its snapshot has no {CONFIG_NAME})")
    if not (folder / WEIGHTS_NAME).is_file():
        raise ConfigError(f"{ref}: {repo} has no {WEIGHTS_NAME} (clipforge reads weights with safetensors only, no pickles)")
    return f"{HF_HUB}{repo}@{folder.name}", folder


def _described(ref: str, pinned: str, kind: ModelKind, folder: Path) -> ResolvedModel:
    if (folder / CONFIG_NAME).is_file():
        config = json.loads((folder / CONFIG_NAME).read_text())["model_cfg"]
    elif (folder / CHECKPOINT_STATE).is_file() and "open_clip_config" in (
        state := json.loads((folder / CHECKPOINT_STATE).read_text())
    ):
        folder, config = _open_clip_view(folder, state["open_clip_config"]), state["open_clip_config"]["model_cfg"]
    else:
        config = None  # a checkpoint of an older version: weights for a warm start, no model to load
    resolved = ResolvedModel(ref, pinned, kind, folder, config)
    if resolved.weights is None:
        raise ConfigError(f"{ref}: {folder} holds {CONFIG_NAME} but no weights ({WEIGHTS_NAME})")
    return resolved


def _open_clip_view(checkpoint: Path, open_clip_config: dict[str, Any]) -> Path:
    """An open_clip folder of a checkpoint (its config from ``state.json``, its weights linked), beside it, not in it."""
    view = _download_dir()
    (view / CONFIG_NAME).write_text(json.dumps(open_clip_config))
    (view / WEIGHTS_NAME).symlink_to((checkpoint / CHECKPOINT_WEIGHTS).resolve())
    return view


def _from_mlflow(uri: str) -> Path:
    """Download a registered, logged or run model; return the open_clip folder inside it."""
    import mlflow

    try:
        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(_download_dir())))
    except Exception as e:  # MlflowException, RestException, OSError, by store and scheme
        raise ConfigError(f"{uri}: cannot fetch the model from MLflow ({mlflow.get_tracking_uri()}): {e}") from None
    folders = sorted({p.parent for p in root.rglob(CONFIG_NAME)})
    if len(folders) != 1:
        found = "no" if not folders else f"{len(folders)}"
        raise ConfigError(f"{uri}: holds {found} open_clip model folders ({CONFIG_NAME}); is it a clipforge model?")
    return folders[0]


def _registry_uri() -> str:
    """The registry the MLflow schemes name models in: ``models:/x/1`` of two registries are two models."""
    import mlflow

    return str(mlflow.get_registry_uri())


def _is_config_name(ref: str) -> bool:
    """An open_clip config name: no path separator, and open_clip knows it."""
    if "/" in ref or "\\" in ref or "://" in ref or Path(ref).exists():
        return False
    import open_clip

    return open_clip.get_model_config(ref) is not None


# -- the per-process download cache -----------------------------------------------------------

_lock = threading.Lock()
_fetched: dict[tuple[int, str, str], Path] = {}
_downloads: dict[int, Path] = {}


def _downloaded(uri: str, options: dict[str, Any] | None, fetch: Callable[[], Path]) -> Path:
    """``fetch()`` once per process for the same immutable ``uri`` (a pinned version, a store folder)
    seen through the same ``options`` (the registry, the storage options)."""
    key = (os.getpid(), uri, json.dumps(options or {}, sort_keys=True, default=str))
    with _lock:  # two threads asking for one scorer download it once
        if key not in _fetched or not _fetched[key].is_dir():
            _fetched[key] = fetch()
        return _fetched[key]


def _download_dir() -> Path:
    """A fresh folder under this process's download folder, which is removed when the process exits."""
    pid = os.getpid()  # a forked child must neither reuse nor remove its parent's folder
    if pid not in _downloads:
        _downloads[pid] = Path(tempfile.mkdtemp(prefix="clipforge-models-"))
        atexit.register(_cleanup, pid)
    return Path(tempfile.mkdtemp(dir=_downloads[pid]))


def _cleanup(pid: int) -> None:
    if os.getpid() == pid and pid in _downloads:
        shutil.rmtree(_downloads.pop(pid), ignore_errors=True)
