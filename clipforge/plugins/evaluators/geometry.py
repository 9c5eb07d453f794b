"""``embedding-geometry``: how the image and text embeddings sit on the sphere.

On the dataset's image-caption pairs (each image with its first caption), all embeddings
L2-normalised:

- ``alignment``: mean squared distance between an image and its caption (Wang & Isola 2020,
  alpha = 2); lower is better, 0 when pairs coincide.
- ``uniformity_image`` / ``uniformity_text``: ``log mean exp(-2 |x - y|^2)`` over all pairs of
  distinct embeddings of one modality (Wang & Isola, t = 2); lower is more uniform, down to
  about -4 for many points spread over a high-dimensional sphere, 0 when all collapse.
- ``modality_gap``: distance between the centroid of the image embeddings and that of the
  text embeddings (Liang et al. 2022, "Mind the Gap").
- ``logit_scale``: the model's learned temperature, ``exp(logit_scale)`` (100 is CLIP's cap).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import torch

import clipforge
from clipforge import EncoderBundle, Sample, embed_images, embed_texts
from clipforge.plugins.evaluators.retrieval import caption_check

NAME = "embedding-geometry"


class GeometryParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batch_size: int = Field(256, gt=0, description="images or captions per forward pass")
    uniformity_sample: int = Field(
        10_000, ge=2, description="uniformity over all pairs of at most this many embeddings, a seeded sample of them"
    )
    seed: int = Field(0, description="picks the sample")


@dataclass
class EmbeddingGeometry:
    """Alignment and uniformity (Wang & Isola), the modality gap, the logit scale."""

    batch_size: int = 256
    uniformity_sample: int = 10_000
    seed: int = 0

    def evaluate(self, bundle: EncoderBundle, dataset: Iterable[Sample], device: str) -> dict[str, float]:
        images, samples = embed_images(
            bundle, dataset, device, self.batch_size, desc=f"{NAME}: images", check=caption_check(NAME)
        )
        if len(samples) < 2:
            raise clipforge.ConfigError(f"{NAME}: the dataset has {len(samples)} samples; it needs at least 2")
        captions = [s.captions[0] for s in samples]
        texts = embed_texts(bundle, captions, device, self.batch_size, desc=f"{NAME}: captions")
        metrics = geometry(images, texts, sample=self.uniformity_sample, seed=self.seed)
        metrics["logit_scale"] = float(bundle.model.logit_scale.detach().float().exp().item())
        return metrics


def geometry(images: torch.Tensor, texts: torch.Tensor, *, sample: int = 10_000, seed: int = 0) -> dict[str, float]:
    """Alignment, uniformity per modality and the modality gap of paired normalised embeddings.

    Uniformity is over the pairs of at most ``sample`` embeddings (a seeded sample of the pairs,
    the same rows for both modalities), summed in blocks: memory stays a block's, whatever the
    dataset's size (``torch.pdist`` of 50,000 embeddings took about 10 GB).
    """
    import torch

    rows = torch.arange(len(images))
    if len(rows) > sample:
        rows = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:sample]
    return {
        "alignment": (images - texts).double().norm(dim=1).pow(2).mean().item(),
        "uniformity_image": uniformity(images[rows]),
        "uniformity_text": uniformity(texts[rows]),
        "modality_gap": (images.double().mean(0) - texts.double().mean(0)).norm().item(),
    }


def uniformity(x: torch.Tensor, block: int = 2048) -> float:
    """``log mean exp(-2 |x_i - x_j|^2)`` over the pairs ``i < j``, block by block, in float64."""
    import torch

    x = x.double()
    n, total = len(x), torch.zeros((), dtype=torch.float64)
    squares = x.pow(2).sum(1)
    for start in range(0, n, block):
        a = x[start : start + block]
        distances = (squares[start : start + block, None] + squares[None, :] - 2 * a @ x.T).clamp_min(0)
        # only the pairs (i, j) with j > i: the strict upper triangle of the full matrix
        upper = torch.arange(n)[None, :] > torch.arange(start, start + len(a))[:, None]
        total += distances.mul(-2).exp().mul(upper).sum()
    return (total / (n * (n - 1) / 2)).log().item()


@clipforge.hookimpl
def register_evaluators(register):
    register(NAME, EmbeddingGeometry, params=GeometryParams)
