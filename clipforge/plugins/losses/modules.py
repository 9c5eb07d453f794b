"""The loss modules behind the ``clip``, ``siglip``, ``dcl`` and ``distill`` plugins (torch is imported here only)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from clipforge import ConfigError, model_cfg_of, resolve_model


def rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _clip_loss(cls, local_loss: bool, gather_with_grad: bool):
    rank, world = rank_and_world()
    return cls(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world)


class Clip(torch.nn.Module):
    """Cross-entropy over the rows and the columns of the scaled similarity matrix (open_clip ClipLoss)."""

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False):
        super().__init__()
        from open_clip.loss import ClipLoss

        self.inner = _clip_loss(ClipLoss, local_loss, gather_with_grad)

    def forward(self, image_features, text_features, logit_scale, logit_bias=None):
        return self.inner(image_features, text_features, logit_scale)


class DecoupledClip(torch.nn.Module):
    """DCL (Yeh et al. 2022): row i costs ``-L_ii + log sum_{j != i} exp(L_ij)``, both directions averaged."""

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False):
        super().__init__()
        from open_clip.loss import ClipLoss

        # ClipLoss gathers the features across ranks and places the targets; the loss is ours
        self.inner = _clip_loss(ClipLoss, local_loss, gather_with_grad)

    def forward(self, image_features, text_features, logit_scale, logit_bias=None):
        per_image, per_text = self.inner.get_logits(image_features, text_features, logit_scale)
        labels = self.inner.get_ground_truth(image_features.device, per_image.shape[0])
        return (decoupled_nce(per_image, labels) + decoupled_nce(per_text, labels)) / 2


def decoupled_nce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-logits[i, labels[i]] + logsumexp of the row without that entry``."""
    positive = logits.gather(1, labels[:, None])[:, 0]
    is_positive = F.one_hot(labels, logits.shape[1]).bool()
    negatives = logits.float().masked_fill(is_positive, float("-inf")).logsumexp(dim=1)
    return (negatives - positive.float()).mean()


class SigLip(torch.nn.Module):
    """Sigmoid loss (open_clip SigLipLoss); the model needs a learned ``logit_bias``."""

    def __init__(self, dist_impl: str = "bidir"):
        super().__init__()
        from open_clip.loss import SigLipLoss

        rank, world = rank_and_world()
        self.inner = SigLipLoss(rank=rank, world_size=world, dist_impl=dist_impl)

    def forward(self, image_features, text_features, logit_scale, logit_bias=None):
        if logit_bias is None:
            raise ConfigError(
                "loss 'siglip' needs a model with a logit bias: set init_logit_bias (e.g. -10) and "
                "init_logit_scale (e.g. 2.3026 = log 10) in the open_clip model config"
            )
        return self.inner(image_features, text_features, logit_scale, logit_bias)


#: Pairs the distillation teacher embeds at a time: its activations never hold a whole large batch.
TEACHER_CHUNK = 256


class Distill(torch.nn.Module):
    """Contrastive loss plus cross-entropy to a frozen teacher's softmax over the logits, both directions (open_clip DistillClipLoss).

    It needs the batch itself (the teacher embeds it): the trainer passes ``images`` and ``texts``
    to losses whose ``needs_inputs`` is true, and calls ``prepare(bundle)`` before training.
    """

    needs_inputs = True

    def __init__(
        self,
        teacher: str,
        weight: float = 1.0,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        storage_options: dict[str, Any] | None = None,  # the recipe's, passed by the host
    ):
        super().__init__()
        from open_clip.loss import DistillClipLoss

        self.inner = _clip_loss(DistillClipLoss, local_loss, gather_with_grad)
        self.weight = weight
        try:
            bundle = resolve_model(teacher, storage_options).load()
        except ConfigError as e:
            raise ConfigError(f"loss 'distill': the teacher {e}") from None
        self.teacher_uri, self.teacher_arch = teacher, model_cfg_of(bundle.arch)
        self.teacher_preprocess = bundle.preprocess_cfg
        self.teacher = bundle.model.eval().requires_grad_(False)
        self._cached: tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]] | None = None

    def prepare(self, bundle) -> None:
        """Check that the teacher reads the student's inputs: same image preprocessing and tokens."""
        student = model_cfg_of(bundle.arch)
        for key in ("size", "mean", "std"):
            ours, theirs = _plain(bundle.preprocess_cfg.get(key)), _plain(self.teacher_preprocess.get(key))
            if ours != theirs:
                raise ConfigError(f"loss 'distill': the teacher's image {key} {theirs} differs from the model's {ours}")
        for key in ("context_length", "vocab_size", "hf_tokenizer_name", "hf_model_name"):
            ours, theirs = student["text_cfg"].get(key), self.teacher_arch["text_cfg"].get(key)
            if ours != theirs:
                raise ConfigError(f"loss 'distill': the teacher's text_cfg.{key} {theirs!r} differs from the model's {ours!r}")

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # frozen, also its dropout and norm statistics
        return self

    def _teacher_outputs(self, images: torch.Tensor, texts: torch.Tensor) -> dict[str, torch.Tensor]:
        """The teacher's features of the batch, embedded once per batch, :data:`TEACHER_CHUNK` pairs at a time.

        With accumulation the trainer calls the loss once per micro-batch with the same whole-batch
        tensors: the teacher embeds them the first time only (the tensors are kept, so that their
        identity cannot be taken by another batch's).
        """
        if self._cached is None or self._cached[0] is not images or self._cached[1] is not texts:
            with torch.no_grad():
                parts = [self.teacher(i, t) for i, t in zip(images.split(TEACHER_CHUNK), texts.split(TEACHER_CHUNK))]
            out = {k: torch.cat([p[k] for p in parts]) for k in ("image_features", "text_features")}
            out["logit_scale"] = parts[0]["logit_scale"]
            self._cached = (images, texts, out)
        return self._cached[2]

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, *, images, texts):
        out = self._teacher_outputs(images, texts)
        losses = self.inner(
            image_features, text_features, logit_scale,
            out["image_features"], out["text_features"], out["logit_scale"], output_dict=True,
        )  # fmt: skip
        distill = losses["distill_loss"] * self.weight
        return {
            "loss": losses["contrastive_loss"] + distill,
            "contrastive_loss": losses["contrastive_loss"],
            "distill_loss": distill,
        }


def _plain(value: Any) -> Any:
    """A preprocessing value comparable across configs: 224 and (224, 224) are one size."""
    if isinstance(value, (int, float)):
        return [float(value)] * 2
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    return value
