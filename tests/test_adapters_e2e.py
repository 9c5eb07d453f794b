"""A LoRA retrain of a hub model through `clipforge run`: the first scheduled run finds no champion
(`if_missing: pretrained`), registers a merged model that plain open_clip loads, and its lineage
names the hub commit and the adapter; the second starts from the first's champion."""

from __future__ import annotations

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from clipforge.cli import main
from tests import test_hub_models
from tests.conftest import write_yaml
from tests.test_hub_models import fill_hub_cache

hub = test_hub_models.hub  # the fixture: a Hugging Face cache of this test's own

pytestmark = pytest.mark.slow


def test_a_lora_retrain_of_a_hub_model_runs_first_without_a_champion_and_registers_a_plain_model(
    tiny_recipe,
    tracking,
    prefect_server,
    hub,
    tmp_path,
):
    home, start = hub
    fill_hub_cache(home, "org/tiny", start, "d" * 40)
    tiny_recipe["model"] = {"type": "open-clip", "arch": "hf-hub:org/tiny"}
    tiny_recipe["train"].update(
        epochs=1,
        adapter={"type": "lora", "r": 4, "targets": ["attention"], "unlock": ["logit_scale"]},
        init_from={"model": "models:/tiny-clip@champion", "if_missing": "pretrained"},
    )
    recipe = write_yaml(tmp_path / "lora.yaml", tiny_recipe)
    assert main(["run", str(recipe)]) == 0

    client = MlflowClient()
    first = client.get_model_version_by_alias("tiny-clip", "champion")
    assert first.tags["clipforge.base_model"] == "hf-hub:org/tiny@" + "d" * 40
    assert first.tags["clipforge.init_from"] == ""  # no champion yet: the hub weights were the start
    assert first.tags["clipforge.adapter_uri"].endswith("/train/adapter")
    run = first.run_id
    logged = {a.path for a in client.list_artifacts(run, "adapter")}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/base_model.json"} <= logged

    import open_clip

    folder = client.download_artifacts(run, "open_clip_model", str(tmp_path / "dl"))
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    assert not any("lora_" in k for k in model.state_dict())
    exported, base = load_file(f"{folder}/open_clip_model.safetensors"), load_file(start / "open_clip_model.safetensors")
    assert torch.equal(exported["token_embedding.weight"], base["token_embedding.weight"])  # not adapted: the hub's

    assert main(["run", str(recipe)]) == 0  # the second run warm-starts from the first's champion
    second = client.get_model_version("tiny-clip", "2")
    assert second.tags["clipforge.init_from"] == f"models:/tiny-clip/{first.version}"
