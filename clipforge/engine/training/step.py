"""One optimizer step's gradients: the loss of a batch, over accumulated micro-batches when asked."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from clipforge.core.components import needs_inputs


def call_loss(loss_fn: Any, out: dict[str, Any], images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """The loss of a batch as a dict with ``"loss"``; a loss that :class:`~clipforge.NeedsInputs` also gets the batch."""
    extra = {"images": images, "texts": tokens} if needs_inputs(loss_fn) else {}
    losses = loss_fn(out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias"), **extra)
    return dict(losses) if isinstance(losses, dict) else {"loss": losses}


def forward_backward(
    model: torch.nn.Module,
    loss_fn: Any,
    micro: list[tuple[torch.Tensor, torch.Tensor]],
    autocast: Callable[[], contextlib.AbstractContextManager[Any]],
    backward: Callable[[torch.Tensor], None],
) -> dict[str, torch.Tensor]:
    """Gradients of the loss over the whole accumulated batch ``micro`` (a list of micro-batches).

    As open_clip_train's ``accum_freq``: the features of every micro-batch are first computed
    without gradients; then each micro-batch is forwarded again with gradients and the loss of
    the full batch (its own features live, the others cached) is backpropagated. The sum of
    these gradients is the gradient of the full-batch loss; unlike open_clip_train, the logit
    scale and bias are live in one pass only, so their gradients are not counted ``len(micro)``
    times. Costs one extra forward per micro-batch.

    Under DDP the passes but the last run in ``no_sync`` and the last one all-reduces every
    gradient: the logit scale and bias are live in that last pass, so that every parameter's
    gradient is ready when the reduction runs (else their bucket never reduces, the next step
    fails, and the ranks' weights drift apart).
    """
    if len(micro) == 1:
        images, tokens = micro[0]
        with autocast():
            losses = call_loss(loss_fn, model(images, tokens), images, tokens)
        if torch.isfinite(losses["loss"]):
            backward(losses["loss"])
        return losses
    with torch.no_grad(), autocast():
        cached = [model(images, tokens) for images, tokens in micro]
    all_images, all_tokens = torch.cat([m[0] for m in micro]), torch.cat([m[1] for m in micro])
    sync = getattr(model, "no_sync", None)  # DDP: all-reduce the gradients once, after the last pass
    for j, (images, tokens) in enumerate(micro):
        last = j == len(micro) - 1
        with contextlib.nullcontext() if (last or sync is None) else sync():
            with autocast():
                live = model(images, tokens)
                out = {
                    key: torch.cat([live[key] if i == j else c[key] for i, c in enumerate(cached)])
                    for key in ("image_features", "text_features")
                }
                for key in ("logit_scale", "logit_bias"):
                    if live.get(key) is not None:
                        out[key] = live[key] if last else live[key].detach()
                losses = call_loss(loss_fn, out, all_images, all_tokens)
            if not torch.isfinite(losses["loss"]):
                return losses
            backward(losses["loss"])
    return losses
