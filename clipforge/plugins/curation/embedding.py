"""Image and text embeddings for curation steps: those of a scoring model, or pixel thumbnails."""

from __future__ import annotations

from collections.abc import Sequence
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


def model_embeddings(
    bundle: clipforge.EncoderBundle, samples: Sequence[Any], device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised image and caption embeddings of a batch (the first caption of a list), as the evaluators compute them."""
    if not samples:
        return np.zeros((0, 0), dtype=np.float32), np.zeros((0, 0), dtype=np.float32)
    n = len(samples)
    images, _ = clipforge.embed_images(bundle, samples, device, n, progress=False)
    texts = clipforge.embed_texts(bundle, [s.captions[0] for s in samples], device, n, progress=False)
    return images.numpy(), texts.numpy()
