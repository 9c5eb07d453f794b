"""``retrieval``: image-text retrieval recall@k with CLIP_benchmark's definitions.

Texts are all the captions (an image may have several). ``image_retrieval_recall@k`` is over
captions: is the caption's image among the k images closest to it. ``text_retrieval_recall@k``
is over images: is any of the image's captions among the k closest texts. ``mean_recall@k``
is their mean, as DataComp reports it.

Per-sample results (:class:`~clipforge.ReportsPerSample`) are per image: text retrieval's hit,
image retrieval's share of the image's captions found (weighted by its captions), and, when every
image has as many captions, the mean of the two.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

from pydantic import BaseModel, ConfigDict, Field

import clipforge
from clipforge import EncoderBundle, PerSample, Sample, embed_images, embed_texts

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
    #: After ``evaluate``: per-image results by metric (what a paired bootstrap resamples).
    per_sample: dict[str, PerSample] = field(default_factory=dict, init=False, repr=False)

    def evaluate(self, bundle: EncoderBundle, dataset: Iterable[Sample], device: str) -> dict[str, float]:
        import torch

        images, samples = embed_images(
            bundle, dataset, device, self.batch_size, desc=f"{NAME}: images", check=caption_check(NAME)
        )
        if not samples:
            raise clipforge.ConfigError(f"{NAME}: the dataset is empty")
        captions = [s.captions for s in samples]
        flat = [c for cs in captions for c in cs]
        texts = embed_texts(bundle, flat, device, self.batch_size, desc=f"{NAME}: captions")
        # the image each caption belongs to
        owner = torch.repeat_interleave(torch.tensor([len(cs) for cs in captions]))

        metrics, ranks = retrieval_metrics(images.to(device), texts.to(device), owner.to(device), self.ks)
        self.per_sample = per_image([s.key for s in samples], ranks, owner, [len(cs) for cs in captions], self.ks)
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
    text_to_image, image_to_text = first_hit_ranks(texts, images, owner, max(ks))
    metrics = {}
    for k in ks:
        image_recall = (text_to_image < k).float().mean().item()
        text_recall = (image_to_text < k).float().mean().item()
        metrics[f"image_retrieval_recall@{k}"] = image_recall
        metrics[f"text_retrieval_recall@{k}"] = text_recall
        metrics[f"mean_recall@{k}"] = (image_recall + text_recall) / 2
    return metrics, {"image_retrieval": text_to_image, "text_retrieval": image_to_text}


def per_image(
    keys: list[str], ranks: dict[str, torch.Tensor], owner: torch.Tensor, counts: list[int], ks: list[int]
) -> dict[str, PerSample]:
    """Each recall@k per image, from the first-hit ranks of :func:`retrieval_metrics`."""
    import torch

    n_captions = torch.tensor(counts, dtype=torch.float64)
    weights = n_captions.tolist()
    records = {}
    for k in ks:
        text = (ranks["text_retrieval"] < k).double()
        found = torch.zeros(len(keys), dtype=torch.float64).index_add_(0, owner.cpu(), (ranks["image_retrieval"] < k).double())
        image = found / n_captions
        records[f"text_retrieval_recall@{k}"] = PerSample(keys, text.tolist())
        records[f"image_retrieval_recall@{k}"] = PerSample(keys, image.tolist(), weights=weights)
        if len(set(counts)) == 1:  # the mean of two means is a mean over images only when captions per image agree
            records[f"mean_recall@{k}"] = PerSample(keys, ((text + image) / 2).tolist())
    return records


def first_hit_ranks(
    texts: torch.Tensor, images: torch.Tensor, owner: torch.Tensor, kmax: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per text and per image, the rank (0-based) of the first relevant item among its ``kmax`` best, else ``kmax``.

    Scores are dot products (cosine similarities for normalised inputs), each computed once:
    the texts go by chunks of rows of the score matrix; a chunk's top images give the texts'
    ranks, and its top texts per image are merged into each image's running ``kmax`` best.
    recall@k for every k <= kmax is then ``(ranks < k).mean()``; a k past the number of
    candidates counts every candidate as retrieved.
    """
    import torch

    n_images = len(images)
    chunk = max(1, SCORES_PER_CHUNK // max(1, n_images))
    text_ranks = []
    best_scores = images.new_empty(n_images, 0)
    best_texts = torch.empty(n_images, 0, dtype=torch.long, device=images.device)
    for start in range(0, len(texts), chunk):
        scores = texts[start : start + chunk] @ images.T
        top = scores.topk(min(kmax, n_images), dim=1).indices
        text_ranks.append(_first_hit(top == owner[start : start + len(scores), None], kmax))
        values, index = scores.T.topk(min(kmax, len(scores)), dim=1)
        merged = torch.cat([best_scores, values], dim=1)
        best_scores, pick = merged.topk(min(kmax, merged.shape[1]), dim=1)
        best_texts = torch.cat([best_texts, index + start], dim=1).gather(1, pick)
    image_hits = owner[best_texts] == torch.arange(n_images, device=images.device)[:, None]
    return torch.cat(text_ranks).cpu(), _first_hit(image_hits, kmax).cpu()


def _first_hit(hits: torch.Tensor, kmax: int) -> torch.Tensor:
    import torch

    # argmax finds the first True; rows without one get kmax
    return torch.where(hits.any(dim=1), hits.int().argmax(dim=1), kmax)


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
