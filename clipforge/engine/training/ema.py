"""An exponential moving average of the trained weights (timm's ``ModelEmaV3``): updated after the
optimizer steps, kept in checkpoints, and exported instead of the raw weights."""

from __future__ import annotations

import torch

from clipforge.core.recipe import EmaConfig


class WeightEma:
    """``theta_ema <- d * theta_ema + (1 - d) * theta`` over the parameters that train (the frozen
    ones never move, so their average is themselves), every ``every`` optimizer steps; ``d`` is
    ``decay``, or with ``warmup`` ``min(decay, (1 + n) / (10 + n))`` at the n-th update as timm."""

    def __init__(self, model: torch.nn.Module, cfg: EmaConfig):
        self.cfg = cfg
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.shadow = {n: p.detach().clone() for n, p in self.params.items()}
        self.updates = 0

    def decay(self) -> float:
        if not self.cfg.warmup:
            return self.cfg.decay
        return min(self.cfg.decay, (1 + self.updates) / (10 + self.updates))

    def after_step(self, step: int) -> None:
        """Called after optimizer step ``step`` (1-based)."""
        if step % self.cfg.every:
            return
        d = self.decay()
        with torch.no_grad():
            names = list(self.shadow)
            torch._foreach_lerp_([self.shadow[n] for n in names], [self.params[n].detach() for n in names], 1.0 - d)
        self.updates += 1

    def state(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().cpu().contiguous().clone() for n, t in self.shadow.items()}

    def load(self, state: dict[str, torch.Tensor], updates: int) -> None:
        if state.keys() != self.shadow.keys():
            raise ValueError(
                f"the checkpoint's EMA holds other weights ({len(state)} tensors, the model trains {len(self.shadow)})"
            )
        with torch.no_grad():
            for n, t in state.items():
                self.shadow[n].copy_(t)
        self.updates = updates

    def copy_to(self, model: torch.nn.Module) -> None:
        """Put the averaged weights into ``model`` (for the export; the raw ones are in the checkpoint)."""
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in self.shadow:
                    p.copy_(self.shadow[n])
