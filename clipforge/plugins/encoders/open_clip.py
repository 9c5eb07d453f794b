"""``open-clip``: any open_clip model, by config name, ``local-dir:`` folder, ``hf-hub:`` model or inline config."""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

import clipforge
from clipforge import EncoderBundle

Positive = Annotated[int, Field(gt=0)]


class VisionCfg(BaseModel):
    model_config = ConfigDict(extra="allow")
    image_size: Positive = 224
    layers: Positive | list[Positive] = 12  # a list of stage depths builds a ResNet tower
    width: Positive = 768
    patch_size: Positive = 16


class TextCfg(BaseModel):
    model_config = ConfigDict(extra="allow")
    context_length: Positive = 77
    vocab_size: Positive = 49408
    width: Positive = 512
    heads: Positive = 8
    layers: Positive = 12


class ModelCfg(BaseModel):
    """An inline open_clip model config (the content of ``model_cfg`` in ``open_clip_config.json``)."""

    model_config = ConfigDict(extra="allow")
    embed_dim: Positive
    vision_cfg: VisionCfg
    text_cfg: TextCfg


class OpenClipParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Two fields rather than one union, so that a bad inline config is reported at its own path
    # (model.config.vision_cfg.width) and not once per union member.
    arch: str | None = Field(
        None,
        description="an open_clip config name (ViT-B-32), 'local-dir:PATH' or 'hf-hub:ORG/NAME[@REVISION]' (with its weights)",
    )
    config: ModelCfg | None = Field(None, description="an inline open_clip model config (model_cfg)")
    pretrained: str | None = Field(None, description="open_clip pretrained tag or weights file (name archs only)")
    image_mean: tuple[float, float, float] | None = None
    image_std: tuple[float, float, float] | None = None
    aug_cfg: dict[str, Any] | None = Field(None, description="open_clip AugmentationCfg for the train transform")
    # Tower locking, as open_clip_train's --lock-image / --lock-text (LiT: a pretrained text tower frozen)
    lock_image: bool = False
    lock_image_unlocked_groups: Annotated[int, Field(ge=0)] = 0
    lock_image_freeze_bn_stats: bool = False
    lock_text: bool = False
    lock_text_unlocked_layers: Annotated[int, Field(ge=0)] = 0
    lock_text_freeze_layer_norm: bool = False

    @model_validator(mode="after")
    def _one_architecture(self) -> OpenClipParams:
        if (self.arch is None) == (self.config is None):
            raise ValueError("give exactly one of 'arch' (a config name or local-dir:PATH) and 'config' (inline)")
        return self

    def input_size(self) -> int | None:
        """The vision tower's ``image_size`` (the larger side of a pair), from the inline config or the
        named one; None for a ``local-dir:`` folder."""
        if self.config is not None:
            return self.config.vision_cfg.image_size
        import open_clip

        assert self.arch is not None
        # a hub model's config is in its snapshot, found as the resolver finds it (the cache, a revision)
        cfg = (
            clipforge.resolve_model(self.arch).config
            if self.arch.startswith("hf-hub:")
            else open_clip.get_model_config(self.arch)
        )
        size = (cfg or {}).get("vision_cfg", {}).get("image_size")
        return size if isinstance(size, int) else (max(size) if isinstance(size, (list, tuple)) else None)


def create_open_clip(
    arch: str | None = None,
    config: ModelCfg | dict[str, Any] | None = None,
    pretrained: str | None = None,
    image_mean=None,
    image_std=None,
    aug_cfg=None,
    lock_image: bool = False,
    lock_image_unlocked_groups: int = 0,
    lock_image_freeze_bn_stats: bool = False,
    lock_text: bool = False,
    lock_text_unlocked_layers: int = 0,
    lock_text_freeze_layer_norm: bool = False,
) -> EncoderBundle:
    """Any open_clip model: a config name, a ``local-dir:`` folder, or an inline config."""
    import open_clip

    if isinstance(config, BaseModel):
        config = config.model_dump(exclude_none=True)
    kwargs: dict[str, Any] = {"image_mean": image_mean, "image_std": image_std, "aug_cfg": aug_cfg, "output_dict": True}
    with tempfile.TemporaryDirectory() as tmp:
        if config is not None:
            # open_clip builds inline configs from a local-dir: folder holding only the config
            (Path(tmp) / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
            hf_tokenizer = config.get("text_cfg", {}).get("hf_tokenizer_name")
            if hf_tokenizer:  # open_clip reads a local-dir model's HF tokenizer from the folder itself
                from transformers import AutoTokenizer

                AutoTokenizer.from_pretrained(hf_tokenizer).save_pretrained(tmp)
            name, model_cfg = f"local-dir:{tmp}", config
        elif arch is not None and arch.startswith("hf-hub:"):
            # through the resolver, not open_clip's own hf-hub: loader: a revision, the cache as the environment names it
            hub = clipforge.resolve_model(arch)
            name, model_cfg = f"local-dir:{hub.folder}", hub.config or {}
        else:
            assert arch is not None  # OpenClipParams asks for exactly one of arch and config
            name, model_cfg = arch, open_clip.get_model_config(arch)
            if model_cfg is None:
                raise clipforge.ConfigError(
                    f"open-clip: unknown arch {arch!r}; use 'local-dir:PATH', an inline config, or one of: "
                    + ", ".join(open_clip.list_models())
                )
            if not arch.startswith("local-dir:"):
                kwargs["pretrained"] = pretrained
        with _expected_random_init(config is not None or pretrained is None):
            model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(name, **kwargs)
        tokenizer = open_clip.get_tokenizer(name)
    if lock_image:
        model.lock_image_tower(unlocked_groups=lock_image_unlocked_groups, freeze_bn_stats=lock_image_freeze_bn_stats)
    if lock_text:
        model.lock_text_tower(unlocked_layers=lock_text_unlocked_layers, freeze_layer_norm=lock_text_freeze_layer_norm)
    return EncoderBundle(
        model=model,
        tokenizer=tokenizer,
        preprocess_train=preprocess_train,
        preprocess_val=preprocess_val,
        arch=model_cfg,
        preprocess_cfg=dict(model.visual.preprocess_cfg),
    )


class _DropRandomInitWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("no CLIP weights found" in msg or "Model initialized randomly" in msg)


@contextlib.contextmanager
def _expected_random_init(expected: bool):
    """Silence open_clip's warnings about random weights where random weights are what was asked for."""
    if not expected:
        yield
        return
    root, flt = logging.getLogger(), _DropRandomInitWarnings()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


@clipforge.hookimpl
def register_encoders(register):
    register("open-clip", create_open_clip, params=OpenClipParams)
