"""The open_clip ``local-dir:`` folder: the one format models leave clipforge in.

``open_clip_config.json`` holds ``model_cfg`` and ``preprocess_cfg``; the weights are
``open_clip_model.safetensors``. Plain open_clip loads it with
``open_clip.create_model_and_transforms("local-dir:PATH")``; no pickle is ever involved.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from clipforge.core.components import EncoderBundle

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"


def model_cfg_of(arch: str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(arch, dict):
        return arch
    import open_clip

    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ValueError(f"unknown open_clip model config {arch!r}")
    return cfg


def state_dict_for_safetensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors, detached, contiguous and unshared, as safetensors requires."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def open_clip_config(bundle: EncoderBundle) -> dict[str, Any]:
    """What ``open_clip_config.json`` holds for ``bundle``: ``model_cfg`` and ``preprocess_cfg``."""
    return {"model_cfg": model_cfg_of(bundle.arch), "preprocess_cfg": _jsonable(bundle.preprocess_cfg)}


def save_open_clip_dir(bundle: EncoderBundle, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``bundle`` as an open_clip ``local-dir:`` folder at ``path`` (a local folder)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = open_clip_config(bundle)
    if extra:
        config["clipforge"] = extra
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    save_file(state_dict_for_safetensors(bundle.model), str(path / WEIGHTS_NAME))
    if hasattr(bundle.tokenizer, "save_pretrained"):  # a Hugging Face tokenizer travels inside the folder
        bundle.tokenizer.save_pretrained(str(path))
    return path


def load_open_clip_dir(path: str | Path, device: str = "cpu") -> EncoderBundle:
    """Load a ``local-dir:`` folder into an :class:`EncoderBundle`, through open_clip itself."""
    import open_clip

    from clipforge.core.components import EncoderBundle

    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{path} is not an open_clip model folder: {CONFIG_NAME} is missing")
    name = f"local-dir:{path}"
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        name, device=device, output_dict=True, weights_only=True
    )
    model.eval()
    config = json.loads((path / CONFIG_NAME).read_text())
    return EncoderBundle(
        model=model,
        tokenizer=open_clip.get_tokenizer(name),
        preprocess_train=preprocess_train,
        preprocess_val=preprocess_val,
        arch=config["model_cfg"],
        preprocess_cfg=dict(model.visual.preprocess_cfg),
    )


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj
