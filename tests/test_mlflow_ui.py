"""What a user reads in the MLflow UI after a retrain, read from the pages a headless Chromium renders:
the run lists its data and its registered model, the logged model its registered version, the
version why it was promoted, above the tags."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.browser import Browser, find_chromium
from tests.conftest import write_yaml
from tests.mlflow_ui import RetrainPages, locate, open_page, section
from tests.services import mlflow_ui_server

pytestmark = pytest.mark.slow

CHROMIUM = find_chromium()


@pytest.fixture(scope="module")
def retrained(tmp_path_factory):
    """A tiny retrain by `clipforge run` (as a user runs it), its SQLite store served by `mlflow server`:
    the UI's address and the store's URI."""
    from tests.conftest import TINY_RECIPE

    work = tmp_path_factory.mktemp("ui")
    recipe = {**TINY_RECIPE, "storage": {"root": str(work / "store")}}
    path = write_yaml(work / "tiny.yaml", recipe)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API"))}
    env["PREFECT_HOME"] = str(work / "prefect")
    cmd = [sys.executable, "-m", "clipforge.cli", "run", str(path), "--workdir", str(work)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    uri = f"sqlite:///{work / 'mlflow.db'}"
    with mlflow_ui_server(uri, work / "mlflow-server.log") as url:
        yield url, uri


@pytest.fixture(scope="module")
def page():
    if CHROMIUM is None:
        pytest.skip("no Chromium binary on this machine (apt-get install -y chromium; .ci/run installs it)")
    with Browser(CHROMIUM, width=1280, height=800) as browser:
        yield browser


@pytest.fixture(scope="module")
def pages(retrained) -> RetrainPages:
    url, uri = retrained
    return RetrainPages.of_version(url, uri, "tiny-clip", "1")


def test_the_logged_model_shows_the_version_it_became(page, pages):
    text = open_page(page, pages, "logged_model")
    assert "Not registered" not in text
    assert section(text, "Model versions")[:2] == ["tiny-clip", "v1"]
    assert pages.run_id in text  # and leads back to its run
    # and the data it was evaluated on, from its metrics
    used = section(text, "Datasets used")
    assert any(line.startswith("eval-") for line in used), used


def test_the_run_lists_its_curated_data_and_its_registered_model(page, pages, retrained):
    from mlflow import MlflowClient

    run = MlflowClient(retrained[1]).get_run(pages.run_id)
    datasets = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    curated = next(name for name in datasets if name.startswith("curated-"))
    assert {name for name in datasets if name.startswith("eval-")}, "no evaluation set among the run's inputs"

    text = open_page(page, pages, "run")
    listed = section(text, "Datasets")
    assert listed and listed[0] == f"{curated} ({datasets[curated].dataset.digest})", listed
    assert "Training" in listed
    # the other inputs (the evaluation sets) are behind a "+N" of the same list
    assert f"+{len(datasets) - 1}" in listed
    assert section(text, "Registered models")[:2] == ["tiny-clip", "v1"]


def test_the_version_says_why_it_was_promoted_in_the_first_screen_above_the_tags(page, pages, retrained):
    from mlflow import MlflowClient

    version = MlflowClient(retrained[1]).get_model_version("tiny-clip", "1")
    reason = version.tags["promotion_reason"]
    assert reason.startswith("first champion (eval/retrieval/mean_recall@1=")
    open_page(page, pages, "model_version")
    where = locate(page, reason)
    assert where["found"], f"the page does not show {reason!r}"
    first = where["found"][0]
    assert where["scrolled"] == 0 and first["bottom"] <= where["viewport"], where  # read without scrolling
    assert re.search(r"promoted to champion", first["text"], re.IGNORECASE), first
    # the version carries only the gate's numbers as tags, all of them below what people read
    metric_tags = locate(page, "metric.")["found"]
    assert len(metric_tags) == sum(k.startswith("metric.") for k in version.tags) == 1
    assert all(tag["top"] > first["bottom"] for tag in metric_tags)
