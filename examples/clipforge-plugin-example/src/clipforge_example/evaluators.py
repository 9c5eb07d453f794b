"""``example-pair-cosine``: how far apart the model puts matching and mismatched image-caption pairs.

``positive_cosine`` is the mean cosine similarity of each image with its own caption;
``negative_cosine`` the mean over pairs of an image with the caption of another sample (of
another class, when the samples have labels); ``cosine_gap`` their difference, which a
contrastive model should push up as it trains. An image with several captions uses its first.
"""

from __future__ import annotations

import io
from collections.abc import Iterable

from PIL import Image

from clipforge import EncoderBundle, Sample


class PairCosine:
    """Mean cosine of matching pairs, of mismatched pairs, and the gap between them."""

    def __init__(self, batch_size: int = 256) -> None:
        self.batch_size = batch_size

    def evaluate(self, bundle: EncoderBundle, dataset: Iterable[Sample], device: str) -> dict[str, float]:
        import torch
        import torch.nn.functional as F

        samples = list(dataset)
        if len(samples) < 2:
            raise ValueError(f"example-pair-cosine: needs at least 2 samples, got {len(samples)}")
        model = bundle.model
        was_training = model.training
        model.to(device).eval()
        images, texts = [], []
        try:
            with torch.no_grad():
                for start in range(0, len(samples), self.batch_size):
                    batch = samples[start : start + self.batch_size]
                    pixels = torch.stack([bundle.preprocess_val(_rgb(s.image)) for s in batch]).to(device)
                    tokens = bundle.tokenizer([s.caption if isinstance(s.caption, str) else s.caption[0] for s in batch])
                    images.append(F.normalize(model.encode_image(pixels).float(), dim=-1).cpu())
                    texts.append(F.normalize(model.encode_text(tokens.to(device)).float(), dim=-1).cpu())
        finally:
            model.train(was_training)
        cosine = torch.cat(images) @ torch.cat(texts).T
        positive = cosine.diagonal().mean().item()
        mismatched = ~torch.eye(len(samples), dtype=torch.bool)
        labels = [s.label for s in samples]
        if all(label is not None for label in labels):
            labels_t = torch.tensor(labels)
            other_class = labels_t[:, None] != labels_t[None, :]
            if other_class.any():
                mismatched = other_class
        negative = cosine[mismatched].mean().item()
        return {"positive_cosine": positive, "negative_cosine": negative, "cosine_gap": positive - negative}


def _rgb(image) -> Image.Image:
    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
    return image.convert("RGB")
