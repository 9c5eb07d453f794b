"""Launchers: the retrain trains on several processes (torchrun) or a Ray runtime and registers the
weights one process gives on the same global batch; bad input and failed ranks are one clear message."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

import clipforge
from clipforge.cli import main
from clipforge.core.errors import ConfigError, StageError
from clipforge.core.resolver import resolve_model
from tests.conftest import write_yaml

VIT = {  # no batch norm: under DDP it normalises each rank's share, not the global batch
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "width": 32, "heads": 2, "layers": 1},
}
TOLERANCE = 1e-5  # float32 sums in another order, over 5 steps
MULTI = {
    "torchrun": ["train.launcher.type=torchrun", "train.launcher.nproc_per_node=2"],
    "ray": ["train.launcher.type=ray", "train.launcher.num_workers=2"],
}


def _recipe(tiny_recipe, tmp_path):
    recipe = copy.deepcopy(tiny_recipe)
    recipe["model"]["config"] = VIT
    recipe["loss"] = {"type": "clip", "gather_with_grad": True, "local_loss": True}  # DDP gradients = the global batch's
    # AdamW moves a weight whose gradient is ~0 by up to lr whatever the gradient's rounding: a small lr
    # keeps that noise below the tolerance, while every step still moves the weights well beyond it
    recipe["train"].update(epochs=1, checkpoint_every=2, lr=2e-4, warmup_steps=0)
    recipe["data"]["eval"]["size"] = 16
    recipe["evaluation"] = [{"type": "retrieval", "ks": [1]}]
    recipe["registry"]["promote"] = {"metric": "retrieval/mean_recall@1"}
    return write_yaml(tmp_path / "recipe.yaml", recipe)


def _retrain(path, *overrides) -> dict[str, torch.Tensor]:
    before = resolve_versions()
    assert main(["run", str(path), *overrides]) == 0
    (new,) = resolve_versions() - before
    return resolve_model(f"models:/tiny-clip/{new}").state_dict()


def resolve_versions() -> set[str]:
    from mlflow import MlflowClient

    return {v.version for v in MlflowClient().search_model_versions("name = 'tiny-clip'")}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(MULTI))
def test_a_launched_retrain_registers_the_weights_of_one_process_on_the_global_batch(
    launcher, tiny_recipe, tmp_path, tracking, prefect_server, monkeypatch
):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the processes run one thread each: float sums in one order on both sides
    path = _recipe(tiny_recipe, tmp_path)
    torch.manual_seed(0)  # the recipe's seed: the weights both runs start from
    start = clipforge.get_plugin_manager().catalog.create("encoders", {"type": "open-clip", "config": VIT}).model.state_dict()
    try:
        for accum in (1, 2):
            common = [f"train.accum_steps={accum}", f"storage.root={tmp_path / f'{launcher}-{accum}'}"]
            one = _retrain(path, *(f"--set={o}" for o in [*common, "train.batch_size=32"]))
            many = _retrain(path, *(f"--set={o}" for o in [*common, "train.batch_size=16", *MULTI[launcher]]))
            assert one.keys() == many.keys()
            worst = max((one[k] - many[k]).abs().max().item() for k in one if one[k].is_floating_point())
            assert worst <= TOLERANCE, (launcher, accum, worst)
            moved = max((one[k] - start[k]).abs().max().item() for k in one if one[k].is_floating_point())
            # the runs trained well beyond the tolerance, so matching is not trivial (bounded by the
            # tolerance, not by this machine's rounding, which comes closer to it on some machines)
            assert moved > 20 * TOLERANCE, (launcher, accum, moved)
    finally:
        torch.set_num_threads(threads)


def test_nproc_per_node_above_the_gpus_is_refused():
    from clipforge.plugins.launchers.torchrun import Torchrun

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ConfigError, match=rf"nproc_per_node: {gpus + 1} processes, but this machine has {gpus} GPU"):
        Torchrun(gpus + 1).processes("cuda")
    assert Torchrun("auto").processes("cpu") == 1 and Torchrun(3).processes("cpu") == 3


def test_ray_missing_names_the_extra(monkeypatch):
    from clipforge.plugins.launchers.ray import RayLauncher

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'clipforge\[ray\]'"):
        RayLauncher().launch(lambda: None, "cpu")


@pytest.mark.slow
def test_an_unreachable_ray_cluster_is_one_clear_error():
    from clipforge.plugins.launchers.ray import RayLauncher

    pytest.importorskip("ray")
    with pytest.raises(StageError, match="cannot reach the Ray cluster at 127.0.0.1:9"):
        RayLauncher(address="127.0.0.1:9").launch(lambda: None, "cpu")


class _Inline:
    """A third party's launcher: runs the job in this process, twice over, as ranks 0 and 1 would in turn."""

    def launch(self, job, device):
        import os

        for rank in (0, 1):
            os.environ.update(RANK=str(rank), WORLD_SIZE="2")
            try:
                job()
            finally:
                del os.environ["RANK"], os.environ["WORLD_SIZE"]


class _InlinePlugin:
    @clipforge.hookimpl
    def register_launchers(self, register):
        register("inline-twice", _Inline, description="each rank in turn, in this process")


def test_a_third_party_launcher_registers_lists_and_conforms(fresh_plugins, capsys):
    import json

    from clipforge.testing import check_component

    fresh_plugins().add_plugin(_InlinePlugin(), "inline")
    assert check_component("launchers", "inline-twice") == 2
    assert main(["plugins", "--json"]) == 0
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert listed["inline"]["components"] == {"launchers": ["inline-twice"]}
    builtin = {name for p in listed.values() for name in p["components"].get("launchers", [])}
    assert {"local", "torchrun", "ray", "inline-twice"} <= builtin


@pytest.mark.slow
def test_a_lora_retrain_on_ray_registers_the_merged_weights_of_one_process(
    tiny_recipe, tmp_path, tracking, prefect_server, monkeypatch
):
    """``train.adapter: lora`` under the Ray launcher: 2 workers on half batches register the merged
    weights that 1 process gives on the whole batch (torchrun: tests/test_adapters.py)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tiny_recipe["train"]["adapter"] = {"type": "lora", "r": 4}
    path = _recipe(tiny_recipe, tmp_path)
    torch.manual_seed(0)
    start = clipforge.get_plugin_manager().catalog.create("encoders", {"type": "open-clip", "config": VIT}).model.state_dict()
    try:
        common = ["train.lr=1e-3", f"storage.root={tmp_path / 'lora'}"]
        one = _retrain(path, *(f"--set={o}" for o in [*common, "train.batch_size=32"]))
        many = _retrain(path, *(f"--set={o}" for o in [*common, "train.batch_size=16", *MULTI["ray"]]))
    finally:
        torch.set_num_threads(threads)
    assert one.keys() == many.keys() and not [k for k in one if "lora_" in k]
    for k in one:
        assert torch.allclose(one[k], many[k], atol=1e-5, rtol=1e-4), (k, (one[k] - many[k]).abs().max().item())
    moved = max((one[k] - start[k]).abs().max().item() for k in one if one[k].is_floating_point())
    assert moved > 1e-4  # the adapter trained and was merged: matching is not trivial
