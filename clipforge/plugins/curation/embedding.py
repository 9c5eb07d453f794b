"""Image and text embeddings for curation steps: a model from the registry or a folder, or pixel thumbnails."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import clipforge


def thumbnails(images: Sequence[Any], side: int = 16) -> np.ndarray:
    """Grey ``side`` x ``side`` thumbnails, centred and L2-normalised: resized or recompressed copies stay close."""
    out = np.empty((len(images), side * side), dtype=np.float32)
    for i, image in enumerate(images):
        out[i] = np.asarray(image.convert("L").resize((side, side)), dtype=np.float32).reshape(-1)
    out -= out.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norms > 0, norms, 1.0)


def load_model(uri: str, device: str = "cpu"):
    """An EncoderBundle from ``models:/NAME@alias`` (or ``models:/NAME/VERSION``) or an open_clip folder."""
    from clipforge.core.checkpoint import CONFIG_NAME, load_open_clip_dir

    if uri.startswith("models:/") or uri.startswith("runs:/"):
        import mlflow

        tmp = tempfile.mkdtemp(prefix="clipforge-scorer-")
        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        folders = [p.parent for p in root.rglob(CONFIG_NAME)]
        if not folders:
            raise clipforge.ConfigError(f"{uri} holds no open_clip model folder ({CONFIG_NAME})")
        return load_open_clip_dir(folders[0], device=device)
    path = uri.removeprefix("local-dir:")
    if not (Path(path) / CONFIG_NAME).is_file():
        raise clipforge.ConfigError(f"{uri}: not a registered model (models:/NAME@alias) nor an open_clip folder")
    return load_open_clip_dir(path, device=device)


def model_embeddings(bundle, samples: Sequence[Any], device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Normalised image and caption embeddings of a batch (the first caption of a list)."""
    import torch

    if not samples:
        return np.zeros((0, 0), dtype=np.float32), np.zeros((0, 0), dtype=np.float32)
    captions = [s.caption if isinstance(s.caption, str) else s.caption[0] for s in samples]
    with torch.no_grad():
        images = torch.stack([bundle.preprocess_val(s.image) for s in samples]).to(device)
        img = bundle.model.encode_image(images, normalize=True)
        txt = bundle.model.encode_text(bundle.tokenizer(captions).to(device), normalize=True)
    return img.float().cpu().numpy(), txt.float().cpu().numpy()
