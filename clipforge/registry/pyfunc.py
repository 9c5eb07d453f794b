"""Log an open_clip ``local-dir:`` folder as an MLflow pyfunc that maps images or texts to embeddings.

The model class lives in :mod:`clipforge.registry.embedding_model`, which is logged as the
model's code rather than pickled, so the logged model loads without clipforge installed.
"""

from __future__ import annotations

import base64
import io
import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.types import Schema, TensorSpec

from clipforge.registry import embedding_model
from clipforge.registry.embedding_model import OPEN_CLIP_ARTIFACT, ClipEmbeddingModel

#: What the logged model needs at load time, pinned to the versions it was logged with.
RUNTIME_PACKAGES = ("mlflow", "torch", "torchvision", "open_clip_torch", "safetensors", "pillow", "pandas", "numpy")

__all__ = ["ClipEmbeddingModel", "embedding_signature", "log_pyfunc_model", "pip_requirements"]


def embedding_signature(embed_dim: int) -> ModelSignature:
    """The output only: float32 ``(-1, D)``.

    The input (optional ``image`` and ``text`` columns, one of the two per row) is checked by the
    model itself: MLflow's schema check drops unknown columns before the model sees them, so that
    a request with a misnamed column could not be told which columns it sent. The model card
    documents the request and the answer.
    """
    return ModelSignature(outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, embed_dim))]))


def pip_requirements() -> list[str]:
    """The runtime packages, pinned to the installed versions (local labels such as ``+cu128`` dropped)."""
    pins = []
    for package in RUNTIME_PACKAGES:
        try:
            pins.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            pins.append(package)
    return pins


def log_pyfunc_model(
    model_dir: Path,
    *,
    name: str = "model",
    input_example_image: bytes | None = None,
    extra_artifacts: dict[str, str] | None = None,
    step: int = 0,
) -> ModelInfo:
    """Log the open_clip folder ``model_dir`` as a pyfunc in the active run; return its ``ModelInfo``.

    ``model_info.model_uri`` is ``models:/m-<id>``: MLflow 3 keeps logged models beside the
    run, not among its artifacts. ``extra_artifacts`` (name -> local path) travel with the model.
    MLflow checks the input example (one image row, one text row; a grey square unless
    ``input_example_image`` is given) by loading the model and predicting on it once. ``step``: the
    training step of the weights; MLflow gives the logged model the run's metrics of that step.
    """
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "open_clip_config.json").read_text())
    artifacts = {OPEN_CLIP_ARTIFACT: str(model_dir)}
    for key, path in (extra_artifacts or {}).items():
        if key in artifacts:
            raise ValueError(f"extra artifact name {key!r} is reserved for the model folder")
        artifacts[key] = str(path)
    image = input_example_image if input_example_image is not None else _grey_png()
    example = {"image": [base64.b64encode(image).decode("ascii"), None], "text": [None, "a photo of a shape"]}
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=embedding_model.__file__,
        artifacts=artifacts,
        signature=embedding_signature(int(config["model_cfg"]["embed_dim"])),
        input_example=pd.DataFrame(example),
        pip_requirements=pip_requirements(),
        step=step,
    )


def _grey_png(size: int = 32) -> bytes:
    """A small PNG, the input example when none is given."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (128, 128, 128)).save(buffer, format="PNG")
    return buffer.getvalue()
