"""deployments/prefect.yaml and `clipforge schedule` against a real Prefect server started here."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from clipforge.core.validation import load_recipe
from tests.conftest import TINY_RECIPE, write_yaml
from tests.crawls import write_shards
from tests.services import free_port, process

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PREFECT = [sys.executable, "-m", "prefect"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A Prefect server on a free port with its own database; the environment its clients need."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    args = [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with (
        process(args, f"{env['PREFECT_API_URL']}/health", home / "server.log", env=env, timeout_s=120),
        httpx.Client(base_url=env["PREFECT_API_URL"], timeout=30) as api,
    ):
        yield env, api


def _run(cmd: list[str], env: dict[str, str], timeout: float = 120, **kw) -> str:
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout, **kw)
    assert out.returncode == 0, f"{' '.join(cmd)} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def _create_pool(name: str, kind: str, env: dict[str, str], *options: str) -> None:
    """Create (or, the server being shared by the module's tests, update) the work pool ``name``."""
    _run([*PREFECT, "work-pool", "create", name, "--type", kind, *options, "--overwrite"], env)


def test_prefect_yaml_deploys_runs_on_a_process_worker_and_registers(server, tmp_path):
    env, api = server
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**env, "CLIPFORGE_HOME": str(REPO), "MLFLOW_TRACKING_URI": tracking}
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["storage"] = {"root": str(tmp_path / "store")}
    recipe_path = write_yaml(tmp_path / "tiny.yaml", recipe)

    _create_pool("clipforge-process", "process", env)
    _run([*PREFECT, "--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--name", "shapes-weekly"], env)
    deployment = api.get("/deployments/name/retrain-recipe/shapes-weekly").json()
    assert deployment["work_pool_name"] == "clipforge-process"
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 3 * * 1"]
    assert deployment["parameters"]["recipe_path"] == "deployments/recipes/shapes-weekly.yaml"
    assert deployment["global_concurrency_limit"]["limit"] == 1
    assert deployment["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    assert deployment["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(REPO)
    assert deployment["job_variables"]["env"]["MLFLOW_TRACKING_URI"] == tracking

    # the parameters a user changes when triggering a run by hand
    out = _run(
        [*PREFECT, "deployment", "run", "retrain-recipe/shapes-weekly",
         "--param", f"recipe_path={recipe_path}", "--param", 'overrides=["train.epochs=1"]'],
        env,
    )  # fmt: skip
    flow_run_id = next(line.split()[-1] for line in out.splitlines() if "UUID" in line)
    _run([*PREFECT, "worker", "start", "--pool", "clipforge-process", "--run-once"], env, timeout=240)
    state = api.get(f"/flow_runs/{flow_run_id}").json()["state"]
    assert state["type"] == "COMPLETED", state

    from mlflow import MlflowClient

    client = MlflowClient(tracking)
    version = client.get_model_version_by_alias("tiny-clip", "champion")
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "1"  # the override reached the recipe
    assert run.data.tags["prefect.flow_run_id"] != flow_run_id  # the retrain runs as a subflow of the deployment's run
    artifacts = api.post(
        "/artifacts/filter", json={"artifacts": {"key": {"any_": ["mlflow-run", "curation-funnel", "evaluation"]}}}
    )
    keys = {a["key"] for a in artifacts.json()}
    assert keys == {"mlflow-run", "curation-funnel", "evaluation"}
    link = next(a for a in artifacts.json() if a["key"] == "mlflow-run")
    assert version.run_id in link["data"] and "mlflow ui" in link["data"]


def test_clipforge_schedule_serves_the_retrain_on_its_cron(server, tmp_path):
    env, api = server
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["storage"] = {"root": str(tmp_path / "store")}
    path = write_yaml(tmp_path / "tiny.yaml", recipe)
    proc = subprocess.Popen(
        [sys.executable, "-m", "clipforge.cli", "schedule", str(path), "--cron", "0 4 * * 0", "--set", "train.epochs=1"],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while (found := api.get("/deployments/name/retrain/retrain-tiny")).status_code == 404:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the served deployment never appeared"
            time.sleep(0.5)
        deployment = found.json()
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 4 * * 0"]
        assert deployment["parameters"]["recipe"]["train"]["epochs"] == 1
        assert deployment["parameters"]["tracking_uri"] == env["MLFLOW_TRACKING_URI"]
        assert deployment["global_concurrency_limit"]["limit"] == 1
        assert proc.poll() is None  # still serving
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_the_gpu_variant_deploys_to_a_kubernetes_pool_that_requests_gpus(server):
    env, api = server
    env = {**env, "CLIPFORGE_HOME": str(REPO)}
    _create_pool("clipforge-k8s-gpu", "kubernetes", env, "--base-job-template", "deployments/k8s-gpu-job-template.json")
    _run([*PREFECT, "--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--name", "shapes-weekly-gpu"], env)
    pool = api.get("/work_pools/clipforge-k8s-gpu").json()
    container = pool["base_job_template"]["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    deployment = api.get("/deployments/name/retrain-recipe/shapes-weekly-gpu").json()
    assert deployment["job_variables"]["gpu_count"] == 1
    assert "train.device=cuda" in deployment["parameters"]["overrides"]
    assert [s["active"] for s in deployment["schedules"]] == [False]


def test_the_launcher_deployments_train_on_every_gpu_of_a_pod_or_on_a_ray_cluster(server):
    env, api = server
    env = {**env, "CLIPFORGE_HOME": str(REPO)}
    _create_pool("clipforge-k8s-gpu", "kubernetes", env, "--base-job-template", "deployments/k8s-gpu-job-template.json")
    for name in ("vit-b32-8gpu", "vit-b32-ray"):
        _run([*PREFECT, "--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--name", name], env)
    pod = api.get("/deployments/name/retrain-recipe/vit-b32-8gpu").json()
    ray = api.get("/deployments/name/retrain-recipe/vit-b32-ray").json()
    recipe = load_recipe(REPO / pod["parameters"]["recipe_path"])
    assert (recipe.train.launcher.type, recipe.train.launcher.fields) == ("torchrun", {"nproc_per_node": "auto"})
    assert pod["job_variables"]["gpu_count"] == 8 and recipe.storage.root.startswith("s3://")
    on_ray = load_recipe(REPO / ray["parameters"]["recipe_path"], ray["parameters"]["overrides"])
    assert (on_ray.train.launcher.type, on_ray.train.launcher.fields) == ("ray", {"num_workers": 16, "use_gpu": True})
    assert ray["job_variables"]["env"]["RAY_ADDRESS"].startswith("ray://") and ray["job_variables"]["gpu_count"] == 0


def _crawl(folder: Path, prefix: str, n: int) -> tuple[str, set[str]]:
    """A crawl's webdataset shards of shapes; returns their brace pattern and keys."""
    from clipforge.plugins.datasets.synthetic_shapes import SyntheticShapes
    from tests.crawls import CrawlSample, encode

    samples = [
        CrawlSample(f"{prefix}-{i:04d}", encode(np.asarray(s.image), "PNG"), s.caption, ext="png")
        for i, s in enumerate(SyntheticShapes(n, seed=len(prefix), image_size=32))
    ]
    return write_shards(folder, samples, per_shard=40), {s.key for s in samples}


def test_new_data_arriving_triggers_a_retrain_on_its_location(server, tmp_path):
    """deployments/prefect.yaml's shapes-on-new-data: `clipforge data-arrived` emits the event, its
    trigger starts a run with the event's location, and the retrain curates and trains on that data."""
    env, api = server
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**env, "CLIPFORGE_HOME": str(REPO), "MLFLOW_TRACKING_URI": tracking}
    old, _ = _crawl(tmp_path / "crawl-1", "first", 64)
    new, new_keys = _crawl(tmp_path / "crawl-2", "second", 96)
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["storage"] = {"root": str(tmp_path / "store")}
    recipe["data"]["train"] = {"type": "webdataset", "urls": old}
    recipe_path = write_yaml(tmp_path / "tiny-crawl.yaml", recipe)

    _create_pool("clipforge-process", "process", env)
    _run([*PREFECT, "--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--name", "shapes-on-new-data"], env)
    deployment = api.get("/deployments/name/retrain-recipe/shapes-on-new-data").json()
    assert deployment["schedules"] == [] and deployment["work_pool_name"] == "clipforge-process"
    assert deployment["parameters"]["recipe_path"] == "deployments/recipes/shapes-crawl.yaml"
    load_recipe(REPO / deployment["parameters"]["recipe_path"])  # the example recipe is valid
    [automation] = [
        a for a in api.post("/automations/filter", json={}).json() if a["actions"][0].get("deployment_id") == deployment["id"]
    ]
    assert automation["trigger"]["expect"] == ["clipforge.data.arrived"]
    assert automation["trigger"]["match"] == {"prefect.resource.id": "clipforge.data.shapes-crawl"}
    # this test's tiny recipe as the deployment's default, as a user edits a deployment
    patched = api.patch(
        f"/deployments/{deployment['id']}",
        json={"parameters": {"recipe_path": str(recipe_path), "overrides": ["train.epochs=1"]}},
    )
    assert patched.status_code == 204, patched.text

    def runs() -> list[dict]:
        found = api.post("/flow_runs/filter", json={"deployments": {"id": {"any_": [deployment["id"]]}}})
        return found.json()

    assert runs() == []
    cli = [sys.executable, "-m", "clipforge.cli", "data-arrived"]
    assert "clipforge.data.shapes-crawl" in _run([*cli, new, "--stream", "shapes-crawl"], env)
    _run([*cli, old, "--stream", "another-crawl"], env)  # another stream: nothing to do with this deployment
    deadline = time.monotonic() + 60
    while not (started := runs()):
        assert time.monotonic() < deadline, "no flow run of the triggered deployment"
        time.sleep(0.5)
    [run] = started
    assert run["parameters"]["data_location"] == new and run["parameters"]["recipe_path"] == str(recipe_path)

    _run([*PREFECT, "worker", "start", "--pool", "clipforge-process", "--run-once"], env, timeout=240)
    state = api.get(f"/flow_runs/{run['id']}").json()["state"]
    assert state["type"] == "COMPLETED", state
    assert len(runs()) == 1  # the other stream's event, long since processed, started nothing

    import pyarrow.parquet as pq
    from mlflow import MlflowClient

    client = MlflowClient(tracking)
    version = client.get_model_version_by_alias("tiny-clip", "champion")
    assert client.get_run(version.run_id).data.params["data.train.urls"] == new
    manifest = version.tags["clipforge.manifest_uri"]  # the curated data the model was trained on
    assert set(pq.read_table(manifest.removeprefix("file://"), columns=["key"]).column("key").to_pylist()) == new_keys


def test_a_retrain_is_found_in_prefect_by_its_run_id_with_its_progress_and_artifacts(server, tmp_path):
    """`clipforge run` against the server: the flow runs are named ``<recipe>-<run id>`` and tagged, the
    train subflow has a progress artifact at 100 % and its step lines, and the stages' artifacts are
    on the retrain run itself (each also on its stage's run, without a key)."""
    import re

    env, api = server
    env = {k: v for k, v in env.items() if not k.startswith("MLFLOW_")}
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["storage"] = {"root": str(tmp_path / "store")}
    path = write_yaml(tmp_path / "tiny.yaml", recipe)
    out = _run([sys.executable, "-m", "clipforge.cli", "run", str(path), "--workdir", str(tmp_path)], env, timeout=300)
    (run_id,) = re.findall(r"done in \d+ s \(run (\S+)\)", out)

    runs = api.post("/flow_runs/filter", json={"flow_runs": {"name": {"any_": [f"tiny-{run_id}"]}}}).json()
    flows = {f["id"]: f["name"] for f in api.post("/flows/filter", json={}).json()}
    by_flow = {flows[r["flow_id"]]: r for r in runs}
    assert sorted(by_flow) == ["curate", "evaluate", "register", "retrain", "train"]
    for stage, flow_run in by_flow.items():
        assert flow_run["state"]["type"] == "COMPLETED", (stage, flow_run["state"])
        assert {"recipe:tiny", "model:tiny-clip"} <= set(flow_run["tags"]), stage
        assert [t for t in flow_run["tags"] if t.startswith("stage:")] == [f"stage:{stage}"]
    retrain = by_flow.pop("retrain")
    # a user finds the retrain by a tag, and its stages under it
    tagged = api.post("/flow_runs/filter", json={"flow_runs": {"tags": {"all_": ["recipe:tiny", "stage:retrain"]}}}).json()
    assert retrain["id"] in {r["id"] for r in tagged}
    children = api.post("/flow_runs/filter", json={"flow_runs": {"parent_flow_run_id": {"any_": [retrain["id"]]}}}).json()
    assert {r["id"] for r in children} == {r["id"] for r in by_flow.values()}

    def artifacts(flow_run: dict, **where) -> dict[str, dict]:
        found = api.post("/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [flow_run["id"]]}, **where}})
        return {a["key"]: a for a in found.json()}

    # training: a progress artifact that ended at 100 % on the train run, and its lines in the run's logs
    progress = artifacts(by_flow["train"], type={"any_": ["progress"]})
    assert set(progress) == {"train-progress"} and float(progress["train-progress"]["data"]) == 100.0
    logs = api.post("/logs/filter", json={"logs": {"flow_run_id": {"any_": [by_flow["train"]["id"]]}}}).json()
    steps = [m["message"] for m in logs if m["message"].startswith("train: step ")]
    assert steps and steps[-1].startswith("train: step 10/10 (epoch 2/2), loss ")
    assert float(artifacts(by_flow["evaluate"], type={"any_": ["progress"]})["evaluate-progress"]["data"]) == 100.0

    # the stages' artifacts, reachable from the retrain run
    on_retrain = artifacts(retrain)
    assert set(on_retrain) == {"curation-funnel", "evaluation", "champion-report", "mlflow-run"}
    assert on_retrain["curation-funnel"]["type"] == "table" and "caption-length" in on_retrain["curation-funnel"]["data"]
    assert f"# Evaluation of run {run_id}" in on_retrain["evaluation"]["data"]
    assert "retrieval/mean_recall@1" in on_retrain["champion-report"]["data"]
    from mlflow import MlflowClient

    version = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_model_version("tiny-clip", "1")
    assert version.run_id in on_retrain["mlflow-run"]["data"]
    for stage, key in [("curate", "curation-funnel"), ("evaluate", "evaluation"), ("register", "champion-report")]:
        [(unkeyed, copy_)] = artifacts(by_flow[stage], type={"not_any_": ["progress"]}).items()
        assert unkeyed is None and copy_["data"] == on_retrain[key]["data"], stage
