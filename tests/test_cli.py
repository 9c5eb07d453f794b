"""The command line: exit codes, one clear message per error, plugins listing, a real run."""

from __future__ import annotations

import json
import os
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
    err = capsys.readouterr().err
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
