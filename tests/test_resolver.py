"""The model resolver: every way to name a model, on the disk, on S3 (a moto server) and in MLflow,
gives the same weights; a reference that names nothing is one clear error; downloads are made
once per process and gone when it exits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import clipforge
from clipforge.core.checkpoint import open_clip_config, save_open_clip_dir
from clipforge.core.errors import ConfigError
from clipforge.core.resolver import resolve_model
from clipforge.core.storage import Store
from clipforge.engine.training.checkpoints import save_checkpoint
from clipforge.engine.training.state import TrainState
from tests.conftest import TINY_CONFIG
from tests.services import ACCESS_KEY, SECRET_KEY, create_bucket, moto_s3


@pytest.fixture(scope="module")
def bundle():
    torch.manual_seed(0)
    return clipforge.get_plugin_manager().catalog.create("encoders", {"type": "open-clip", "config": TINY_CONFIG})


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with moto_s3(tmp_path_factory.mktemp("moto")) as endpoint:
        create_bucket(endpoint, "models")
        yield endpoint


@pytest.fixture
def s3_env(s3, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3)
    return s3


def embed(loaded) -> torch.Tensor:
    tokens = loaded.tokenizer(["a red circle", "two blue squares"])
    with torch.no_grad():
        return loaded.model.eval().encode_text(tokens)


def checkpoint(store: Store, bundle, with_config: bool = True) -> str:
    optimizer = torch.optim.AdamW(bundle.model.parameters())
    config = open_clip_config(bundle) if with_config else None
    return save_checkpoint(store, "train", TrainState(step=3, epoch=0), bundle.model, optimizer, None, config)


def test_folders_by_path_local_dir_and_file_uri_are_one_model(bundle, tmp_path):
    folder = save_open_clip_dir(bundle, tmp_path / "model")
    want = embed(bundle)
    for ref in (str(folder), f"local-dir:{folder}", f"file://{folder}"):
        resolved = resolve_model(ref)
        assert (resolved.kind, resolved.pinned, resolved.folder) == ("folder", ref, folder)
        assert resolved.config == bundle.arch
        assert torch.allclose(embed(resolved.load()), want, atol=1e-6)


def test_a_checkpoint_is_a_model_and_an_older_one_gives_its_weights(bundle, tmp_path):
    store = Store(str(tmp_path / "store"))
    new = resolve_model(store.uri(checkpoint(store, bundle)))
    assert new.kind == "checkpoint" and torch.allclose(embed(new.load()), embed(bundle), atol=1e-6)
    assert sorted(store.ls("train/checkpoints/step-00000003")) == [
        "model.safetensors",
        "optimizer.safetensors",
        "rng.safetensors",
        "state.json",
    ]  # the model view is made beside the checkpoint, not in it
    old_store = Store(str(tmp_path / "old"))
    old = resolve_model(old_store.uri(checkpoint(old_store, bundle, with_config=False)))
    assert old.kind == "checkpoint" and old.config is None
    assert old.state_dict().keys() == bundle.model.state_dict().keys()
    with pytest.raises(ConfigError, match="a checkpoint without open_clip_config.json"):
        old.load()


def test_a_config_name_is_an_architecture_without_weights():
    resolved = resolve_model("RN50")
    assert (resolved.kind, resolved.folder, resolved.weights) == ("config", None, None)
    assert resolved.config["embed_dim"] == 1024
    with pytest.raises(ConfigError, match="no weights"):
        resolved.state_dict()


@pytest.mark.parametrize("ref", ["{tmp}/nowhere", "{tmp}", "hf-hub:org/model", "", "models:/nobody@champion"])
def test_what_names_no_model_is_one_clear_error(ref, tmp_path, tracking):
    with pytest.raises(ConfigError) as e:
        resolve_model(ref.format(tmp=tmp_path))
    message = str(e.value)
    if ref.startswith("{tmp}"):
        assert "not a registered model" in message and "not an open_clip model folder" in message
    elif ref.startswith("models:/"):
        assert "no such registered model alias" in message


def test_a_folder_and_a_checkpoint_on_s3_download_once_per_process(bundle, s3_env, tmp_path):
    store = Store("s3://models/zoo")
    store.put_dir(save_open_clip_dir(bundle, tmp_path / "model"), "exported")
    first = resolve_model(store.uri("exported"))
    again = resolve_model(store.uri("exported"))
    assert first.kind == "folder" and first.folder == again.folder  # the same download, not a second one
    assert torch.allclose(embed(again.load()), embed(bundle), atol=1e-6)
    ckpt = resolve_model(store.uri(checkpoint(store, bundle)))
    assert ckpt.kind == "checkpoint" and torch.allclose(embed(ckpt.load()), embed(bundle), atol=1e-6)


def test_downloads_are_removed_when_the_process_exits(bundle, s3_env, tmp_path):
    store = Store("s3://models/exit")
    store.put_dir(save_open_clip_dir(bundle, tmp_path / "model"), "m")
    code = f"from clipforge.core.resolver import resolve_model; print(resolve_model({store.uri('m')!r}).folder)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    folder = Path(done.stdout.strip().splitlines()[-1])
    assert folder.name and not folder.exists()


def test_registered_logged_and_run_models_resolve_to_the_same_weights(bundle, tmp_path, tracking):
    import mlflow

    from clipforge.registry import ensure_experiment, log_pyfunc_model, register_version, set_champion

    folder = save_open_clip_dir(bundle, tmp_path / "model")
    with mlflow.start_run(experiment_id=ensure_experiment("resolver", str(tmp_path / "art"))) as run:
        mlflow.log_artifacts(str(folder), "open_clip_model")
        info = log_pyfunc_model(folder)
    version = register_version(info.model_uri, "resolver-clip", tags={}, metrics={}, run_id=run.info.run_id)
    set_champion("resolver-clip", version.version, reason="test")
    want = embed(bundle)
    refs = {
        "models:/resolver-clip@champion": ("registered", f"models:/resolver-clip/{version.version}"),
        f"models:/resolver-clip/{version.version}": ("registered", f"models:/resolver-clip/{version.version}"),
        info.model_uri: ("logged", info.model_uri),
        f"runs:/{run.info.run_id}/open_clip_model": ("run", f"runs:/{run.info.run_id}/open_clip_model"),
    }
    for ref, (kind, pinned) in refs.items():
        resolved = resolve_model(ref)
        assert (resolved.kind, resolved.pinned) == (kind, pinned), ref
        assert torch.allclose(embed(resolved.load()), want, atol=1e-6), ref


def test_every_caller_takes_every_scheme(bundle, tmp_path, s3_env, tracking):
    """What failed before one resolver: a scorer on S3, a teacher from runs:/, clipforge evaluate of a checkpoint."""
    import mlflow

    from clipforge.cli import main
    from tests.conftest import TINY_RECIPE, write_yaml

    store = Store("s3://models/callers")
    store.put_dir(save_open_clip_dir(bundle, tmp_path / "model"), "scorer")
    catalog = clipforge.get_plugin_manager().catalog
    step = catalog.create("curation_steps", {"type": "clip-score", "model": store.uri("scorer"), "threshold": -1.0})
    samples = [clipforge.Sample("a", _image(), "a red square")]
    assert step(samples)[0].keep

    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(tmp_path / "model"), "teacher")
    loss = catalog.create("losses", {"type": "distill", "teacher": f"runs:/{run.info.run_id}/teacher"})
    assert torch.equal(loss.teacher.text_projection, bundle.model.text_projection)

    local = Store(str(tmp_path / "store"))
    recipe = {**json.loads(json.dumps(TINY_RECIPE)), "storage": {"root": str(tmp_path / "store")}}
    recipe["evaluation"] = [{"type": "retrieval", "ks": [1]}]
    recipe["data"]["eval"]["size"] = 8
    path = write_yaml(tmp_path / "r.yaml", recipe)
    assert main(["evaluate", local.uri(checkpoint(local, bundle)), "--recipe", str(path), "--device", "cpu"]) == 0


def _image():
    from PIL import Image

    return Image.new("RGB", (32, 32), "red")
