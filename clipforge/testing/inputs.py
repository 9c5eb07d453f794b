"""The tiny inputs the checks feed components: small enough that a check takes well under a second."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from clipforge.core.components import EncoderBundle, Sample

if TYPE_CHECKING:
    import torch

#: A ResNet image tower and a one-layer text transformer with 32-d embeddings: builds in ~0.1 s.
TINY_ENCODER_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
    "text_cfg": {"context_length": 16, "width": 32, "heads": 2, "layers": 1},
}


@dataclass
class Features:
    """What the trainer hands a loss: the model's ``output_dict`` of one batch.

    Every tensor is a leaf that requires grad, so a check can see which ones the loss reaches.
    ``logit_scale`` is already exponentiated, as open_clip's ``output_dict`` returns it.
    """

    image_features: torch.Tensor
    text_features: torch.Tensor
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor | None = None


def tiny_features(batch_size: int = 8, dim: int = 16, *, logit_bias: bool = False, seed: int = 0) -> Features:
    """A batch of L2-normalised image and text features; text ``i`` is a noisy copy of image ``i``."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(batch_size, dim, generator=g), dim=-1)
    texts = F.normalize(images + 0.5 * torch.randn(batch_size, dim, generator=g), dim=-1)
    return Features(
        image_features=images.requires_grad_(),
        text_features=texts.requires_grad_(),
        logit_scale=torch.tensor(1 / 0.07).requires_grad_(),  # open_clip's initial temperature
        logit_bias=torch.tensor(-10.0).requires_grad_() if logit_bias else None,  # SigLIP's initial bias
    )


def tiny_encoder_bundle(config: dict[str, Any] | None = None) -> EncoderBundle:
    """A randomly initialised open_clip model built from ``config`` (default :data:`TINY_ENCODER_CONFIG`)."""
    from clipforge.core.plugins import get_plugin_manager

    bundle: EncoderBundle = get_plugin_manager().catalog.create(
        "encoders", {"type": "open-clip", "config": config or TINY_ENCODER_CONFIG}
    )
    return bundle


def tiny_dataset(size: int = 16, seed: int = 0):
    """A classification dataset with captions: ``synthetic-shapes`` at 32 px (has ``classes`` and ``templates``)."""
    from clipforge.core.plugins import get_plugin_manager

    return get_plugin_manager().catalog.create(
        "datasets", {"type": "synthetic-shapes", "size": size, "seed": seed, "image_size": 32}
    )


def tiny_samples(size: int = 8, seed: int = 0) -> list[Sample]:
    """Samples as curation steps receive them: decoded RGB PIL images, text captions, labels.

    One caption is a single word and one is a list of captions, so that steps meet both forms.
    """
    from clipforge.engine.shards import decode

    samples = [decode(s).sample for s in tiny_dataset(size, seed)]
    if size >= 2:
        samples[1].caption = str(samples[1].caption).split()[-1]
    if size >= 3:
        samples[2].caption = [*samples[2].captions, f"{samples[2].captions[0]} again"]
    return samples
