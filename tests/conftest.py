"""Shared fixtures: a tiny recipe, an isolated MLflow store, a Prefect test server."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

# Before anything imports Prefect: a cold first start of its server takes longer than the 20 s default.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The commands record their registry in the user's config folder: the tests' own, never the user's.
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="clipforge-config-")

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
    "text_cfg": {"context_length": 16, "width": 32, "heads": 2, "layers": 1},
}

TINY_RECIPE: dict[str, Any] = {
    "name": "tiny",
    "data": {
        "train": {"type": "synthetic-shapes", "size": 160, "seed": 0, "image_size": 32},
        "eval": {"type": "synthetic-shapes", "size": 60, "seed": 1, "image_size": 32},
    },
    "curation": [{"type": "caption-length", "min_words": 2}],
    "model": {"type": "open-clip", "config": TINY_CONFIG},
    "loss": {"type": "clip"},
    "train": {"epochs": 2, "batch_size": 32, "lr": 1e-3, "warmup_steps": 2, "checkpoint_every": 4, "seed": 0},
    "evaluation": [{"type": "zero-shot-classification"}, {"type": "retrieval", "ks": [1, 5]}],
    "registry": {"model_name": "tiny-clip", "promote": {"metric": "retrieval/mean_recall@1", "mode": "max"}},
}


@pytest.fixture
def tiny_recipe(tmp_path) -> dict[str, Any]:
    """The tiny recipe as raw data, its store in this test's tmp_path."""
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["storage"] = {"root": str(tmp_path / "store")}
    return recipe


@pytest.fixture
def tracking(tmp_path, monkeypatch) -> str:
    """This test's own MLflow SQLite store, set through the environment and undone afterwards."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)
    yield uri
    mlflow.tracking._tracking_service.utils._tracking_uri = None


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server (fresh database) for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def fresh_plugins(monkeypatch):
    """A plugin manager rebuilt for this test (after it changed the environment), restored afterwards."""
    from clipforge.core import plugins

    monkeypatch.setattr(plugins, "_manager", None)
    yield plugins.get_plugin_manager
    plugins.reset_plugin_manager()


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def kill_at_step(cmd: list[str], env: dict[str, str], step: int) -> None:
    """Runs ``cmd``, a trainer that prints ``step N`` after each step, and kills it with SIGKILL once
    it has printed ``step``: a crash at that step, with no chance to clean up."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == f"step {step}":
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the trainer ended before step {step}"
