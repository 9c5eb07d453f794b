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

from pydantic import BaseModel, ConfigDict, Field

import clipforge
from clipforge.core.components import EncoderBundle, Sample
from clipforge.plugins.evaluators.retrieval import caption_check

NAME = "embedding-geometry"


class GeometryParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batch_size: int = Field(256, gt=0, description="images or captions per forward pass")


@dataclass
class EmbeddingGeometry:
    """Alignment and uniformity (Wang & Isola), the modality gap, the logit scale."""

    batch_size: int = 256

    def evaluate(self, bundle: EncoderBundle, dataset: Iterable[Sample], device: str) -> dict[str, float]:
        from clipforge.core.embeddings import embed_images, embed_texts

        images, samples = embed_images(
            bundle, dataset, device, self.batch_size, desc=f"{NAME}: images", check=caption_check(NAME)
        )
        if len(samples) < 2:
            raise clipforge.ConfigError(f"{NAME}: the dataset has {len(samples)} samples; it needs at least 2")
        captions = [s.captions[0] for s in samples]
        texts = embed_texts(bundle, captions, device, self.batch_size, desc=f"{NAME}: captions")
        metrics = geometry(images, texts)
        metrics["logit_scale"] = float(bundle.model.logit_scale.detach().float().exp().item())
        return metrics


def geometry(images, texts) -> dict[str, float]:
    """Alignment, uniformity per modality and the modality gap of paired normalised embeddings."""
    import torch

    def uniformity(x: torch.Tensor) -> float:
        return torch.pdist(x.double()).pow(2).mul(-2).exp().mean().log().item()

    return {
        "alignment": (images - texts).double().norm(dim=1).pow(2).mean().item(),
        "uniformity_image": uniformity(images),
        "uniformity_text": uniformity(texts),
        "modality_gap": (images.double().mean(0) - texts.double().mean(0)).norm().item(),
    }


@clipforge.hookimpl
def register_evaluators(register):
    register(NAME, EmbeddingGeometry, params=GeometryParams)
