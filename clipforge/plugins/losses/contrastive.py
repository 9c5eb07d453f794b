"""``clip``: the symmetric InfoNCE loss of CLIP, as open_clip's ``ClipLoss`` computes it."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

import clipforge


class ClipLossParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    local_loss: bool = False
    gather_with_grad: bool = False


def create_clip_loss(local_loss: bool = False, gather_with_grad: bool = False):
    """Cross-entropy over the rows and the columns of the scaled similarity matrix (open_clip ClipLoss)."""
    import torch
    from open_clip.loss import ClipLoss

    class Clip(torch.nn.Module):
        def __init__(self):
            super().__init__()
            rank, world = (
                (torch.distributed.get_rank(), torch.distributed.get_world_size())
                if torch.distributed.is_available() and torch.distributed.is_initialized()
                else (0, 1)
            )
            self.inner = ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world)

        def forward(self, image_features, text_features, logit_scale, logit_bias=None):
            return self.inner(image_features, text_features, logit_scale)

    return Clip()


@clipforge.hookimpl
def register_losses(register):
    register("clip", create_clip_loss, params=ClipLossParams)
