"""The command line: exit codes, one clear message per error, plugins listing, a real run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from clipforge.cli import main
from tests.conftest import write_yaml


def test_validate_ok_and_bad(tmp_path, tiny_recipe, capsys):
    path = write_yaml(tmp_path / "r.yaml", tiny_recipe)
    assert main(["validate", str(path)]) == 0
    assert "valid" in capsys.readouterr().out
    code = main(["validate", str(path), "--set", "train.epochs=0", "--set", "model.config.embed_dim=-3"])
    err = capsys.readouterr().err
    assert code == 2
    assert "train.epochs: Input should be greater than 0" in err
    assert "model.config.embed_dim: Input should be greater than 0" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["validate", "missing.yaml"], "recipe file not found: missing.yaml"),
        (["validate", "{recipe}", "--set", "train.nope=1"], "'train.nope' is not a field of the recipe"),
        (["run", "{recipe}", "--stage", "evaluate"], "give its --run-id"),
    ],
)
def test_bad_input_exits_2_with_one_message(tmp_path, tiny_recipe, capsys, args, message):
    path = write_yaml(tmp_path / "r.yaml", tiny_recipe)
    assert main([a.format(recipe=path) for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unknown_component_lists_available_names(tmp_path, tiny_recipe, capsys):
    tiny_recipe["data"]["train"]["type"] = "laion"
    assert main(["validate", str(write_yaml(tmp_path / "r.yaml", tiny_recipe))]) == 2
    err = capsys.readouterr().err  # installed plugins (the example one in CI) add names to the list
    assert "data.train.type: unknown dataset 'laion'; available: " in err and "synthetic-shapes" in err


def test_plugins_lists_builtin_components_by_kind(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "encoders: open-clip" in out and "curation_steps: caption-length" in out
    assert main(["plugins", "--json"]) == 0
    infos = json.loads(capsys.readouterr().out)
    components = {c for i in infos for names in i["components"].values() for c in names}
    assert {"open-clip", "clip", "synthetic-shapes", "zero-shot-classification", "retrieval", "caption-length"} <= components
    assert all(i["status"] == "ok" and i["version"] for i in infos)


def test_schema_is_json(capsys):
    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out)["title"] == "Recipe"


@pytest.mark.slow
def test_run_a_recipe_from_the_command_line(tmp_path, tiny_recipe):
    """`clipforge run` in a fresh process, Prefect in its ephemeral mode, MLflow in a SQLite file."""
    path = write_yaml(tmp_path / "r.yaml", tiny_recipe)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API"))}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    cmd = [sys.executable, "-m", "clipforge.cli", "run", str(path), "--set", "train.epochs=1", "--workdir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "registered: tiny-clip version 1 -> champion" in proc.stdout
    (ui,) = [line for line in proc.stdout.splitlines() if "mlflow ui" in line]
    assert f"sqlite:///{tmp_path}/mlflow.db" in ui
    assert (tmp_path / "mlflow.db").exists()


def test_evaluate_a_checkpoint_folder_prints_a_table_and_writes_json(tmp_path, tiny_recipe, capsys, tracking):
    import torch

    from clipforge.core.checkpoint import save_open_clip_dir
    from clipforge.core.plugins import get_plugin_manager

    torch.manual_seed(0)
    bundle = get_plugin_manager().catalog.create("encoders", tiny_recipe["model"])
    folder = save_open_clip_dir(bundle, tmp_path / "model")
    tiny_recipe["data"]["eval"]["size"] = 20
    tiny_recipe["evaluation"] = [{"type": "retrieval", "ks": [1, 5]}, {"type": "embedding-geometry"}]
    path = write_yaml(tmp_path / "r.yaml", tiny_recipe)
    out = tmp_path / "m.json"
    assert main(["evaluate", str(folder), "--recipe", str(path), "--device", "cpu", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads(out.read_text())
    assert "eval/retrieval/mean_recall@5" in printed and "eval/embedding-geometry/logit_scale" in printed
    assert metrics["eval/embedding-geometry/logit_scale"] == pytest.approx(1 / 0.07, rel=1e-4)
    # a store URI of the same folder gives the same numbers
    assert main(["evaluate", f"file://{folder}", "--recipe", str(path), "--device", "cpu", "--output", str(out)]) == 0
    assert json.loads(out.read_text()) == metrics


@pytest.mark.parametrize("uri", ["{tmp}/nowhere", "{tmp}"])
def test_evaluate_refuses_what_is_no_model(tmp_path, tiny_recipe, capsys, uri, tracking):
    path = write_yaml(tmp_path / "r.yaml", tiny_recipe)
    assert main(["evaluate", uri.format(tmp=tmp_path), "--recipe", str(path)]) == 2
    err = capsys.readouterr().err
    assert "not an open_clip model folder" in err and "Traceback" not in err


@pytest.mark.slow
def test_a_failed_flow_prints_clipforge_s_message_and_no_traceback_unless_debug(tmp_path):
    """Prefect logs a failed flow run with its traceback; the terminal shows only clipforge's one line."""
    import tarfile

    tarfile.open(tmp_path / "empty.tar", "w").close()
    recipe = {
        "name": "fails",
        "storage": {"root": str(tmp_path / "store")},
        "data": {"train": {"type": "webdataset", "urls": str(tmp_path / "empty.tar")}},
        "model": {"type": "open-clip", "arch": "RN50"},
    }
    path = write_yaml(tmp_path / "r.yaml", recipe)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API"))}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    # an archive without members is one defective row of the manifest, so the dataset keeps none of its one pair
    message = "failed: curate: the training dataset 'webdataset' kept none of its 1 pairs (empty shard: 1)"
    for debug in ([], ["--debug"]):
        cmd = [sys.executable, "-m", "clipforge.cli", "run", str(path), "--workdir", str(tmp_path), *debug]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
        assert proc.returncode == 1, proc.stderr[-3000:]
        if debug:
            assert "Traceback" in proc.stderr and "StageError" in proc.stderr
        else:
            assert message in proc.stderr and "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
            # one error line (not Prefect's copies of it), then the command that resumes the run
            lines = proc.stderr.splitlines()
            assert [ln for ln in lines if ln.startswith(("failed:", "error:")) or "| ERROR" in ln] == [
                ln for ln in lines if ln.startswith("failed:")
            ] and sum(ln.startswith("failed:") for ln in lines) == 1, proc.stderr[-3000:]
            assert "Encountered exception" not in proc.stderr
            resume = [ln for ln in lines if ln.startswith("resume:")]
            assert len(resume) == 1 and re.fullmatch(
                rf"resume:  clipforge run {re.escape(str(path))} --workdir \S+ --run-id \S+", resume[0]
            )
