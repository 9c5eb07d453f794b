"""``retrieval``: image-text retrieval recall@k with CLIP_benchmark's definitions.

Texts are all the captions (an image may have several). ``image_retrieval_recall@k`` is over
captions: is the caption's image among the k images closest to it. ``text_retrieval_recall@k``
is over images: is any of the image's captions among the k closest texts. ``mean_recall@k``
is their mean, as DataComp reports it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

from pydantic import BaseModel, ConfigDict, Field

import clipforge
from clipforge.core.components import EncoderBundle, Sample

if TYPE_CHECKING:
    import torch

NAME = "retrieval"
# Queries scored per step: bounds the similarity block to about this many floats (64 MiB)
SCORES_PER_CHUNK = 1 << 24
#: Images (with their first caption) shown in the similarity heatmap.
FIGURE_PAIRS = 32


class RetrievalParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ks: list[Annotated[int, Field(gt=0)]] = Field([1, 5, 10], min_length=1, description="the k of each recall@k")
    batch_size: int = Field(256, gt=0, description="images or captions per forward pass")


@dataclass
class Retrieval:
    """Image-to-text and text-to-image recall@k (CLIP_benchmark) and their mean (DataComp)."""

    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    batch_size: int = 256
    #: After ``evaluate``: the data of its figures (recall@k curves, a similarity matrix).
    details: dict = field(default_factory=dict, init=False, repr=False)

    def evaluate(self, bundle: EncoderBundle, dataset: Iterable[Sample], device: str) -> dict[str, float]:
        import torch

        from clipforge.plugins.evaluators.embeddings import embed_images, embed_texts

        images, samples = embed_images(
            bundle, dataset, device, self.batch_size, desc=f"{NAME}: images", check=caption_check(NAME)
        )
        if not samples:
            raise clipforge.ConfigError(f"{NAME}: the dataset is empty")
        captions = [[s.caption] if isinstance(s.caption, str) else list(s.caption) for s in samples]
        flat = [c for cs in captions for c in cs]
        texts = embed_texts(bundle, flat, device, self.batch_size, desc=f"{NAME}: captions")
        # the image each caption belongs to
        owner = torch.repeat_interleave(torch.tensor([len(cs) for cs in captions]))

        metrics, ranks = retrieval_metrics(images.to(device), texts.to(device), owner.to(device), self.ks)
        # for the figures: recall@k for every k up to the largest, and the first images' similarities
        n = min(FIGURE_PAIRS, len(samples))
        first = torch.tensor([0, *torch.cumsum(torch.tensor([len(cs) for cs in captions]), 0)[:-1].tolist()])[:n]
        kmax = max(self.ks)
        self.details = {
            "recall_curve": {
                "k": list(range(1, kmax + 1)),
                "image_retrieval": [(ranks["image_retrieval"] < k).float().mean().item() for k in range(1, kmax + 1)],
                "text_retrieval": [(ranks["text_retrieval"] < k).float().mean().item() for k in range(1, kmax + 1)],
            },
            "similarity": (images[:n] @ texts[first].T).tolist(),
        }
        return metrics


def retrieval_metrics(
    images: torch.Tensor, texts: torch.Tensor, owner: torch.Tensor, ks: list[int]
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """recall@k both ways from normalised embeddings; ``owner[t]`` is the image of text ``t``.

    Returns the metrics and, per direction, each query's first-hit rank (``max(ks)`` when missed).
    """
    kmax = max(ks)
    text_to_image = first_hit_ranks(texts, images, kmax, lambda q, top: top == owner[q, None])
    image_to_text = first_hit_ranks(images, texts, kmax, lambda q, top: owner[top] == q[:, None])
    metrics = {}
    for k in ks:
        image_recall = (text_to_image < k).float().mean().item()
        text_recall = (image_to_text < k).float().mean().item()
        metrics[f"image_retrieval_recall@{k}"] = image_recall
        metrics[f"text_retrieval_recall@{k}"] = text_recall
        metrics[f"mean_recall@{k}"] = (image_recall + text_recall) / 2
    return metrics, {"image_retrieval": text_to_image, "text_retrieval": image_to_text}


def first_hit_ranks(
    queries: torch.Tensor,
    keys: torch.Tensor,
    kmax: int,
    is_hit: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """For each query, the rank (0-based) of its first relevant key among its ``kmax`` best, else ``kmax``.

    Scores are dot products (cosine similarities for normalised inputs). ``is_hit(q, top)`` gets
    the query indices of a chunk and their top key indices ``(len(q), k)`` and says which are
    relevant. recall@k for every k <= kmax is then ``(ranks < k).mean()``; a k past the number of
    keys counts every key as retrieved.
    """
    import torch

    k = min(kmax, len(keys))
    chunk = max(1, SCORES_PER_CHUNK // max(1, len(keys)))
    ranks = []
    for start in range(0, len(queries), chunk):
        q = torch.arange(start, min(start + chunk, len(queries)), device=queries.device)
        top = (queries[q] @ keys.T).topk(k, dim=1).indices
        hits = is_hit(q, top)
        # argmax finds the first True; rows without one get kmax
        ranks.append(torch.where(hits.any(dim=1), hits.int().argmax(dim=1), kmax))
    return torch.cat(ranks).cpu()


def caption_check(evaluator: str) -> Callable[[Sample], None]:
    """A check that each sample has a non-empty caption or list of captions (errors name ``evaluator``)."""

    def check(s: Sample) -> None:
        # an image without a caption cannot be retrieved by text and would skew text recall to 0
        if not s.caption or not (isinstance(s.caption, str) or all(isinstance(c, str) and c for c in s.caption)):
            raise clipforge.ConfigError(f"{evaluator}: sample {s.key!r} has an empty or non-text caption: {s.caption!r}")

    return check


@clipforge.hookimpl
def register_evaluators(register):
    register(NAME, Retrieval, params=RetrievalParams)
