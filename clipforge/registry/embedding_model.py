"""The MLflow pyfunc that maps images or texts to normalized embeddings with an open_clip model.

This file is logged as the model's code ("models from code"): MLflow copies it into every
logged model and executes it to load the model, so nothing is unpickled and the model loads
where only mlflow, open_clip_torch, torch, pillow, pandas and numpy are installed. Hence it
imports nothing from clipforge.

Input: a pandas DataFrame (or what one is made of: a dict of columns, a list of row dicts) with a
column ``image`` (encoded image bytes, or their base64 text, optionally as a ``data:`` URL) and/or
a column ``text`` (str); each row holds exactly one of the two. Output: a float32 array
``(rows, embed_dim)`` of L2-normalized embeddings, row order kept.

Bad input raises :class:`BadInput`, an ``MlflowException`` with ``INVALID_PARAMETER_VALUE``, which
``mlflow models serve`` answers with HTTP 400 and the message as it was raised.
``mlflow.pyfunc.load_model(uri, model_config={"device": "cuda", "batch_size": 64})`` picks the
device (default: cuda when available) and the batch size.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel, PythonModelContext

#: The name of the artifact holding the open_clip ``local-dir:`` folder.
OPEN_CLIP_ARTIFACT = "open_clip_model"


class BadInput(MlflowException, ValueError):
    """A request the model cannot embed; the message says what is wrong and in which row.

    MLflow's scoring server maps ``INVALID_PARAMETER_VALUE`` to HTTP 400, but it rewrites the message
    of any ``MlflowException`` raised in ``predict`` into ``Failed to predict data '<the whole
    input>'``: the answer is serialised from the message as raised instead, so that the client
    reads clipforge's sentence and not a dump of its own request.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)
        self.reason = message

    def serialize_as_json(self) -> str:
        return json.dumps({"error_code": self.error_code, "message": self.reason})


class ClipEmbeddingModel(PythonModel):
    """Images or texts -> L2-normalized embeddings, with an open_clip ``local-dir:`` model."""

    def load_context(self, context: PythonModelContext) -> None:
        import open_clip
        import torch

        config = context.model_config or {}
        self.device = config.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = int(config.get("batch_size", 64))
        folder = Path(context.artifacts[OPEN_CLIP_ARTIFACT])
        self.embed_dim = int(json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]["embed_dim"])
        name = f"local-dir:{folder}"
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(name, device=self.device, weights_only=True)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(name)

    def predict(self, context: PythonModelContext, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        import torch

        model_input = _frame(model_input)
        images, texts = _split_rows(model_input)
        out = np.zeros((len(model_input), self.embed_dim), dtype=np.float32)
        with torch.inference_mode():
            for rows, batch in _batches(images, self.batch_size):
                pixels = torch.stack([self.preprocess(_decode_image(row, value)) for row, value in zip(rows, batch)])
                feats = self.model.encode_image(pixels.to(self.device), normalize=True)
                out[rows] = feats.float().cpu().numpy()
            for rows, batch in _batches(texts, self.batch_size):
                feats = self.model.encode_text(self.tokenizer(batch).to(self.device), normalize=True)
                out[rows] = feats.float().cpu().numpy()
        return out


def _frame(model_input: Any) -> pd.DataFrame:
    """The input as a DataFrame: served JSON arrives as one, or as the dict or records it was made of."""
    if isinstance(model_input, pd.DataFrame):
        return model_input
    if isinstance(model_input, (dict, list)):
        try:
            return pd.DataFrame(model_input)
        except ValueError as e:
            raise BadInput(f"input is not a table of 'image' and/or 'text' columns: {e}") from e
    raise BadInput(f"input must be a table of 'image' and/or 'text' columns, not {type(model_input).__name__}")


def _split_rows(df: pd.DataFrame) -> tuple[list[tuple[int, Any]], list[tuple[int, str]]]:
    """(position, value) of the image rows and of the text rows; a row needs exactly one of the two."""
    if "image" not in df.columns and "text" not in df.columns:
        raise BadInput(f"input needs a column 'image' and/or 'text'; got columns {[str(c) for c in df.columns]}")
    images: list[tuple[int, Any]] = []
    texts: list[tuple[int, str]] = []
    image_col = [_cell(v) for v in df["image"]] if "image" in df.columns else [None] * len(df)
    text_col = [_cell(v) for v in df["text"]] if "text" in df.columns else [None] * len(df)
    for row, (image, text) in enumerate(zip(image_col, text_col)):
        has_image, has_text = not _is_null(image), not _is_null(text)
        if has_image and has_text:
            raise BadInput(f"row {row} has both an image and a text; give one per row")
        if has_image:
            images.append((row, image))
        elif has_text:
            texts.append((row, str(text)))
        else:
            raise BadInput(f"row {row} has neither an image nor a text")
    return images, texts


def _cell(value: Any) -> Any:
    """A table cell as a plain value: MLflow's scoring server hands ``instances`` over as 0-d arrays."""
    return value.item() if isinstance(value, np.ndarray) and value.ndim == 0 else value


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA


def _batches(items: list[tuple[int, Any]], size: int):
    for start in range(0, len(items), size):
        chunk = items[start : start + size]
        yield [row for row, _ in chunk], [value for _, value in chunk]


def _decode_image(row: int, value: Any):
    """An RGB PIL image from encoded bytes or base64 text (plain or a ``data:`` URL)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, str):
        try:
            text = value.split(",", 1)[1] if value.startswith("data:") else value
            value = base64.b64decode("".join(text.split()), validate=True)  # line breaks allowed, nothing else
        except ValueError as e:  # binascii.Error is a ValueError
            raise BadInput(f"row {row}: cannot decode the image: it is not base64 text ({e})") from e
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise BadInput(f"row {row}: cannot decode the image: expected base64 text or bytes, got {type(value).__name__}")
    try:
        with Image.open(io.BytesIO(bytes(value))) as image:
            return image.convert("RGB")
    except UnidentifiedImageError as e:
        raise BadInput(
            f"row {row}: cannot decode the image: its {len(value)} bytes are not an image file of a known format"
        ) from e
    except Exception as e:  # a truncated or damaged file of a known format
        raise BadInput(f"row {row}: cannot decode the image: its {len(value)} bytes are damaged ({type(e).__name__}: {e})") from e


# MLflow executes this file under a generated module name to load a logged model; a plain
# `import clipforge.registry.embedding_model` must not set a model as a side effect.
if __name__ != "clipforge.registry.embedding_model":
    mlflow.models.set_model(ClipEmbeddingModel())
