"""Models and checkpoints load without unpickling: safetensors only, and no unsafe ``torch.load`` in the code."""

from __future__ import annotations

import ast
import json
import pickle
from pathlib import Path

import pytest
import torch

import clipforge
from clipforge.core.checkpoint import load_open_clip_dir, save_open_clip_dir
from clipforge.core.components import EncoderBundle
from clipforge.core.storage import Store
from clipforge.engine.training.checkpoints import load_checkpoint, save_checkpoint
from clipforge.engine.training.state import TrainState

PACKAGE = Path(clipforge.__file__).parent
TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 8, "width": 32, "heads": 2, "layers": 1},
}
PICKLERS = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib"}


def unsafe_loads(source: str, filename: str) -> list[str]:
    """``torch.load`` calls without ``weights_only=True`` and imports of pickle-based loaders, as 'file:line'."""
    tree = ast.parse(source, filename)
    torch_load_names = {"torch.load"}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "torch":
            torch_load_names |= {a.asname or a.name for a in node.names if a.name == "load"}
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(m.split(".")[0] in PICKLERS for m in modules):
                found.append(f"{filename}:{node.lineno} imports {', '.join(modules)}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func) in torch_load_names:
            safe = any(
                k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True for k in node.keywords
            )
            if not safe:
                found.append(f"{filename}:{node.lineno} {ast.unparse(node)}")
    return found


def test_the_scan_catches_unsafe_loads():
    src = "import torch\nfrom torch import load as L\nimport pickle\ntorch.load(p)\nL(p, weights_only=False)\ntorch.load(p, weights_only=True)\n"
    assert unsafe_loads(src, "x.py") == ["x.py:3 imports pickle", "x.py:4 torch.load(p)", "x.py:5 L(p, weights_only=False)"]


def test_no_unsafe_torch_load_or_pickle_in_the_package():
    found = [hit for f in sorted(PACKAGE.rglob("*.py")) for hit in unsafe_loads(f.read_text(), str(f.relative_to(PACKAGE)))]
    assert found == []


@pytest.fixture
def no_unpickling(monkeypatch):
    """Make every way to unpickle fail loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


def test_model_folders_and_checkpoints_load_without_unpickling(tmp_path, no_unpickling):
    import open_clip

    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY}))
    model, train_tf, val_tf = open_clip.create_model_and_transforms(f"local-dir:{cfg}")
    bundle = EncoderBundle(
        model, open_clip.get_tokenizer(f"local-dir:{cfg}"), train_tf, val_tf, TINY, dict(model.visual.preprocess_cfg)
    )
    folder = save_open_clip_dir(bundle, tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    loaded = load_open_clip_dir(folder)
    for (name, want), got in zip(model.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(want, got), name

    store = Store(str(tmp_path / "store"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 3, 32, 32), bundle.tokenizer(["a"]))[0].sum().backward()
    optimizer.step()
    rel = save_checkpoint(store, "train", TrainState(step=1), model, optimizer, None)
    assert sorted(store.ls(rel)) == ["model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"]
    fresh = torch.optim.AdamW(loaded.model.parameters(), lr=1e-3)
    assert load_checkpoint(store, rel, loaded.model, fresh, None).step == 1
    want, got = optimizer.state_dict()["state"], fresh.state_dict()["state"]
    assert want and sorted(got) == sorted(want)
    assert all(torch.equal(got[i]["exp_avg"], want[i]["exp_avg"]) for i in want)
