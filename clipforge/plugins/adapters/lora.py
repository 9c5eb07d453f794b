"""``lora``: low-rank adapters (Hu et al. 2021) through peft, on open_clip's towers as they are.

``targets`` names groups of modules, ``attention`` (``nn.MultiheadAttention``, whose input and
output projections peft adapts, and the linear layers of Hugging Face attention blocks) and
``mlp`` (the other linear layers of the towers' blocks), or module names (a dotted suffix, as
peft's ``target_modules``). Only the modules of the named ``towers`` are adapted: ``image``
under ``visual.``, ``text`` everywhere else.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

import clipforge

Tower = Literal["image", "text"]
GROUPS = ("attention", "mlp")
_ATTENTION_PARTS = ("attn", "attention", "self_attn")
#: Modules whose linear layers' weights are read directly (F.multi_head_attention_forward), never called: an adapter on them would do nothing until merged
_READ_DIRECTLY = ("attnpool",)


class LoraParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: Annotated[int, Field(gt=0)] = Field(8, description="the rank of every update")
    alpha: Annotated[int, Field(gt=0)] = Field(16, description="the update is scaled by alpha / r")
    dropout: Annotated[float, Field(ge=0, lt=1)] = Field(0.0, description="dropout on the adapter's input")
    towers: list[Tower] = Field(default_factory=lambda: list[Tower](["image", "text"]), min_length=1)
    targets: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=lambda: ["attention", "mlp"],
        min_length=1,
        description="attention, mlp, or module names (a dotted suffix)",
    )


def tower_of(name: str) -> Tower:
    return "image" if name.startswith("visual.") else "text"


def candidates(model: Any) -> dict[str, str]:
    """The modules LoRA can adapt, by name: their group (``attention`` or ``mlp``), or ``""`` for a
    linear layer outside the towers' blocks (a projection), which only a module name targets."""
    import torch

    found: dict[str, str] = {}
    attention_modules = {n for n, m in model.named_modules() if isinstance(m, torch.nn.MultiheadAttention)}
    for name, module in model.named_modules():
        if name in attention_modules:
            found[name] = "attention"
        elif isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[0] not in attention_modules:
            parts = name.split(".")
            if any(p in _READ_DIRECTLY for p in parts):
                continue
            if any(p in _ATTENTION_PARTS for p in parts):
                found[name] = "attention"
            elif any(p.isdigit() for p in parts):  # a layer of a block: resblocks.N, layer.N
                found[name] = "mlp"
            else:
                found[name] = ""
    return found


def _merges_in_forward(module: Any) -> bool:
    """peft's LoRA of ``nn.MultiheadAttention`` adds its update to the base weights for each forward and
    subtracts it after, which leaves float rounding in the frozen weights."""
    from peft.tuners.lora.layer import MultiheadAttention

    return isinstance(module, MultiheadAttention)


def _restore_base(module: Any) -> Any:
    """A forward hook putting the frozen base weights back bit for bit after each forward."""
    import torch

    saved = {n: p.detach().clone() for n, p in module.named_parameters() if "lora_" not in n}

    def hook(mod: Any, args: Any, output: Any) -> None:
        with torch.no_grad():
            for n, p in mod.named_parameters():
                if n in saved:
                    p.copy_(saved[n])

    return hook


class Lora:
    """peft's LoRA injected into the open_clip model in place (``LoraModel``), merged back with
    ``merge_and_unload``; saved in peft's format (``adapter_config.json``, ``adapter_model.safetensors``)."""

    def __init__(self, r: int = 8, alpha: int = 16, dropout: float = 0.0, towers=("image", "text"), targets=GROUPS):
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.towers, self.targets = list(towers), list(targets)
        self._tuner: Any = None
        self._hooks: list[Any] = []
        self._config: Any = None

    def target_modules(self, model: Any) -> list[str]:
        """The names of the modules this adapter adapts in ``model``; a target that matches none is a ConfigError."""
        found = {n: g for n, g in candidates(model).items() if tower_of(n) in self.towers}
        chosen: list[str] = []
        for target in self.targets:
            if target in GROUPS:
                names = [n for n, g in found.items() if g == target]
            else:
                names = [n for n in found if n == target or n.endswith("." + target)]
            if not names:
                shapes = sorted({re.sub(r"\.\d+(?=\.|$)", ".N", n) for n in found})
                raise clipforge.ConfigError(
                    f"train.adapter.targets: {target!r} matches no module of the {' and '.join(self.towers)} tower(s); "
                    f"give {' or '.join(GROUPS)} or one of: {', '.join(shapes) or 'none'}"
                )
            chosen += [n for n in names if n not in chosen]
        return chosen

    def apply(self, model: Any) -> None:
        from peft import LoraConfig
        from peft.tuners.lora import LoraModel

        for tower in self.towers:
            params = [p for n, p in model.named_parameters() if tower_of(n) == tower and n not in ("logit_scale", "logit_bias")]
            if params and not any(p.requires_grad for p in params):
                raise clipforge.ConfigError(
                    f"train.adapter.towers: the {tower} tower is locked (model.lock_{tower}); "
                    f"unlock it or leave it out of the adapter's towers"
                )
        self._config = LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=self.target_modules(model), bias="none"
        )
        self._tuner = LoraModel(model, self._config, "default")  # injects in place, freezes every other weight
        self._hooks = [m.register_forward_hook(_restore_base(m)) for m in model.modules() if _merges_in_forward(m)]

    def merge(self, model: Any) -> None:
        if self._tuner is None or self._tuner.model is not model:
            raise clipforge.ConfigError("lora: merge() of a model this adapter was not applied to")
        for hook in self._hooks:
            hook.remove()
        self._tuner.merge_and_unload()
        self._tuner = None

    def save(self, model: Any, folder: str) -> None:
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        state = get_peft_model_state_dict(model, adapter_name="default")
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, f"{folder}/adapter_model.safetensors")
        self._config.save_pretrained(folder)


@clipforge.hookimpl
def register_adapters(register):
    register("lora", Lora, params=LoraParams, description="low-rank adapters (peft) on the towers' attention and MLP layers")
