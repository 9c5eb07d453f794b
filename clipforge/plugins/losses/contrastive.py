"""The contrastive losses: ``clip`` (InfoNCE), ``siglip`` (sigmoid), ``dcl`` (decoupled) and ``distill``.

Each works under ``torch.distributed`` as open_clip's losses do: features are gathered from
every rank (``gather_with_grad``: gradients flow through the gathered copies; ``local_loss``:
a rank computes only its own rows). With ``gather_with_grad`` the DDP-averaged gradients equal
those of one process holding the whole global batch; without it the towers' gradients are
``1/world_size`` of them (the logit scale's, used whole by every rank, is whole), as in open_clip.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

import clipforge


class GatherParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    local_loss: bool = Field(False, description="each rank computes only its own rows of the logits")
    gather_with_grad: bool = Field(False, description="gradients flow through the features gathered from other ranks")


class SigLipParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dist_impl: str = Field("bidir", pattern="^(bidir|shift|reduce|gather)$", description="how text features travel between ranks")


class DistillParams(GatherParams):
    teacher: str = Field(
        description="the frozen teacher, any model reference: models:/NAME@champion, models:/NAME/VERSION, runs:/..., a folder (local-dir:PATH, s3://...), a checkpoint"
    )
    weight: float = Field(1.0, ge=0, description="weight of the distillation term beside the contrastive loss")


def _lazy(name: str):
    """A factory that imports torch only when the loss is built (listing plugins must stay light)."""

    def factory(**fields):
        from clipforge.plugins.losses import modules

        return getattr(modules, name)(**fields)

    factory.__doc__ = f"the {name} loss module"
    return factory


def create_distill(storage_options: dict[str, Any] | None = None, **fields):
    """The distill loss module; the host passes the recipe's ``storage.options``, which open the teacher."""
    from clipforge.plugins.losses import modules

    return modules.Distill(**fields, storage_options=storage_options)


@clipforge.hookimpl
def register_losses(register):
    register("clip", _lazy("Clip"), params=GatherParams, description="CLIP's symmetric InfoNCE (open_clip ClipLoss)")
    register("siglip", _lazy("SigLip"), params=SigLipParams, description="SigLIP's pairwise sigmoid loss (open_clip SigLipLoss)")
    register(
        "dcl",
        _lazy("DecoupledClip"),
        params=GatherParams,
        description="decoupled contrastive loss: the positive left out of the denominator",
    )
    register(
        "distill", create_distill, params=DistillParams, description="contrastive loss plus distillation from a frozen teacher"
    )
