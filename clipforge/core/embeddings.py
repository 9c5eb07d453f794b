"""Embeddings of a model: L2-normalised image and text features, computed in batches, in eval mode
and the weights' dtype. Evaluators and curation steps (built-in or not) compute them here.

Both functions return float32 CPU tensors, whatever the model's device and dtype, so that the
metrics code sees one kind of input. torch, PIL and tqdm are imported on first use: ``import
clipforge`` exports these functions and must stay light.

Inside ``with shared_embeddings():`` (the evaluate stage opens one around all its evaluators)
the embeddings of a dataset object and of a list of texts are computed once per model and
handed to every evaluator that asks again: retrieval, geometry and compositionality on the
same ``data.eval`` encode its images once. Outside it, every call computes afresh.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from clipforge.core.components import EncoderBundle, Sample
from clipforge.core.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from PIL import Image


def load_image(image: Any, key: str = "?") -> Image.Image:
    """A sample's image as an RGB PIL image; encoded bytes are decoded."""
    from PIL import Image

    if isinstance(image, (bytes, bytearray, memoryview)):
        try:
            image = Image.open(io.BytesIO(image))
            image.load()
        except Exception as e:  # PIL raises several kinds on corrupt data
            raise ConfigError(f"sample {key!r}: cannot decode its image: {e}") from e
    if not isinstance(image, Image.Image):
        raise ConfigError(f"sample {key!r}: image must be a PIL image or encoded bytes, got {type(image).__name__}")
    return image.convert("RGB")


def embed_images(
    bundle: EncoderBundle,
    samples: Iterable[Sample],
    device: str,
    batch_size: int,
    desc: str = "images",
    check: Callable[[Sample], None] | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, list[Sample]]:
    """Normalised image embeddings ``(N, D)`` of ``samples``, and the samples without their images.

    The samples are read once, in a stream (a dataset may be a one-pass iterable), and their
    images are dropped so that only one batch of pixels is held at a time. ``check`` sees each
    sample first and raises on a bad one, so bad input fails before every image is embedded.
    Within :func:`shared_embeddings` a dataset already embedded by this model is not read
    again: ``check`` runs on its kept samples and the cached embeddings are returned.
    ``progress=False`` hides the progress bar (a caller embedding many small batches).
    """
    cache = _CACHE.get()
    key = (id(bundle.model), id(samples))
    if cache is not None and key in cache.images:
        features, kept = cache.images[key]
        if check is not None:
            for sample in kept:
                check(sample)
        return features, kept
    features, kept = _embed_images(bundle, samples, device, batch_size, desc if progress else None, check)
    if cache is not None:
        # the dataset is kept alive with its entry so that its id is not reused by another object
        cache.images[key] = (features, kept)
        cache.keep.append(samples)
    return features, kept


def _embed_images(
    bundle: EncoderBundle,
    samples: Iterable[Sample],
    device: str,
    batch_size: int,
    desc: str | None,
    check: Callable[[Sample], None] | None,
) -> tuple[torch.Tensor, list[Sample]]:
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    kept: list[Sample] = []
    chunks: list[torch.Tensor] = []
    batch: list[torch.Tensor] = []
    with _inference(bundle.model, device) as (model, dtype):

        def flush() -> None:
            features = model.encode_image(torch.stack(batch).to(device, dtype))
            chunks.append(F.normalize(features.float(), dim=-1).cpu())
            batch.clear()

        for sample in tqdm(
            samples,
            desc=desc,
            total=len(samples) if isinstance(samples, Sized) else None,
            unit="img",
            disable=None if desc is not None else True,
        ):
            if check is not None:
                check(sample)
            batch.append(bundle.preprocess_val(load_image(sample.image, sample.key)))
            kept.append(dataclasses.replace(sample, image=None))
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    return (torch.cat(chunks) if chunks else torch.empty(0, 0)), kept


def embed_texts(
    bundle: EncoderBundle, texts: Sequence[str], device: str, batch_size: int, desc: str = "texts", progress: bool = True
) -> torch.Tensor:
    """Normalised text embeddings ``(len(texts), D)``; within :func:`shared_embeddings`, once per model and text list."""
    cache = _CACHE.get()
    key = (id(bundle.model), tuple(texts))
    if cache is not None and key in cache.texts:
        return cache.texts[key]
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    chunks: list[torch.Tensor] = []
    with _inference(bundle.model, device) as (model, _):
        for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch", disable=None if progress else True):
            tokens = bundle.tokenizer(list(texts[start : start + batch_size])).to(device)
            chunks.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    features = torch.cat(chunks) if chunks else torch.empty(0, 0)
    if cache is not None:
        cache.texts[key] = features
    return features


@dataclasses.dataclass
class EmbeddingCache:
    """Embeddings computed during one evaluation, by (model, dataset object) and (model, texts)."""

    images: dict[tuple[int, int], tuple[torch.Tensor, list[Sample]]] = dataclasses.field(default_factory=dict)
    texts: dict[tuple[int, tuple[str, ...]], torch.Tensor] = dataclasses.field(default_factory=dict)
    keep: list[Any] = dataclasses.field(default_factory=list)


_CACHE: ContextVar[EmbeddingCache | None] = ContextVar("clipforge_embedding_cache", default=None)


@contextmanager
def shared_embeddings() -> Iterator[EmbeddingCache]:
    """Share embeddings between the evaluators run inside; the cache is dropped on exit.

    The model must not change inside (the evaluate stage evaluates one frozen model): entries
    are keyed by object identity, not by weights.
    """
    cache = EmbeddingCache()
    token = _CACHE.set(cache)
    try:
        yield cache
    finally:
        _CACHE.reset(token)


@contextmanager
def _inference(model: Any, device: str) -> Iterator[tuple[Any, torch.dtype]]:
    """``model`` on ``device`` in eval mode without gradients; its train/eval mode is restored after."""
    import torch

    was_training = model.training
    model.to(device).eval()
    # images must match the weights' dtype (a bf16 model rejects float32 pixels)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    try:
        with torch.no_grad():
            yield model, dtype
    finally:
        model.train(was_training)
