"""Decoupled contrastive learning (Yeh et al., ECCV 2022, arXiv:2110.06848).

InfoNCE's denominator holds the positive pair itself, which couples the gradient of the
positive with that of the negatives and makes small batches learn slowly. DCL drops it:

    L_i = -s_ii / t + log sum_{j != i} exp(s_ij / t)

for both directions (image -> text, text -> image), averaged. DCLW multiplies the positive term
by ``w_i = 2 - N exp(s_ii / sigma) / sum_k exp(s_kk / sigma)`` (the authors' code: a softmax
over the batch's positives), so hard positives weigh more; the weights average 1 and carry no
gradient.
"""

from __future__ import annotations

import torch


class DecoupledContrastiveLoss(torch.nn.Module):
    """Symmetric DCL over a batch of paired, normalised features; ``logit_scale`` is 1/t (exponentiated)."""

    def __init__(self, weighted: bool = False, sigma: float = 0.5) -> None:
        super().__init__()
        self.weighted, self.sigma = weighted, sigma

    def forward(self, image_features, text_features, logit_scale, logit_bias=None):
        similarity = image_features @ text_features.T
        losses = {
            "image_to_text": self._one_way(similarity, logit_scale),
            "text_to_image": self._one_way(similarity.T, logit_scale),
        }
        return {"loss": (losses["image_to_text"] + losses["text_to_image"]) / 2, **losses}

    def _one_way(self, similarity: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        n = similarity.shape[0]
        positives = similarity.diagonal()
        eye = torch.eye(n, dtype=torch.bool, device=similarity.device)
        # the positive leaves the denominator; a batch of one has no negatives and no loss
        negatives = torch.logsumexp((logit_scale * similarity).masked_fill(eye, float("-inf")), dim=1)
        if n == 1:
            negatives = torch.zeros_like(negatives)
        weight = 1.0
        if self.weighted:
            with torch.no_grad():
                weight = 2 - n * torch.softmax(positives / self.sigma, dim=0)
        return (-weight * logit_scale * positives + negatives).mean()
