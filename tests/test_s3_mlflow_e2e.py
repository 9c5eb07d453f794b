"""A whole retrain with every artifact on S3 and MLflow behind a tracking server, the way users run it.

One moto S3 server, one proxy in front of it that answers 503 SlowDown to one request in ten,
and one MLflow server whose artifacts go to the same bucket through that proxy. The store
reaches S3 through the proxy too, its endpoint and credentials given as ``${ENV_VAR}``
references in ``storage.options``. The retrain must succeed anyway, leave only whole objects,
and leak the credentials nowhere; then ``mlflow models serve`` serves the champion.
"""

from __future__ import annotations

import base64
import io
import json
import os
import tarfile
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from PIL import Image
from safetensors import safe_open

from tests.conftest import TINY_RECIPE
from tests.services import (
    ACCESS_KEY,
    BIN,
    SECRET_KEY,
    FaultProxy,
    create_bucket,
    free_port,
    incomplete_uploads,
    list_objects,
    mlflow_server,
    moto_s3,
    process,
)

pytestmark = pytest.mark.slow

BUCKET = "clipforge-e2e"
MODEL = TINY_RECIPE["registry"]["model_name"]


@pytest.fixture(scope="module")
def retrained(tmp_path_factory, prefect_server):
    """Run the tiny recipe once against S3 (through the faulty proxy) and the MLflow server."""
    workdir = tmp_path_factory.mktemp("s3e2e")
    with moto_s3(workdir) as s3, FaultProxy(s3, every=10).running() as proxy, pytest.MonkeyPatch.context() as mp:
        create_bucket(s3, BUCKET)
        with mlflow_server(workdir, proxy.url, f"s3://{BUCKET}/mlflow") as server:
            # the client side knows S3 only through the recipe's references; MLflow only through its server
            for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
                mp.delenv(name, raising=False)
            mp.setenv("CF_S3_KEY", ACCESS_KEY)
            mp.setenv("CF_S3_SECRET", SECRET_KEY)
            mp.setenv("CF_S3_ENDPOINT", proxy.url)
            mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
            mp.setenv("MLFLOW_TRACKING_URI", server)
            mp.setenv("CLIPFORGE_LOCK_DIR", str(workdir / "locks"))
            mp.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)
            mp.setattr(mlflow.tracking._model_registry.utils, "_registry_uri", None)
            recipe = {
                **TINY_RECIPE,
                "storage": {
                    "root": f"s3://{BUCKET}/store",
                    "options": {"key": "${CF_S3_KEY}", "secret": "${CF_S3_SECRET}", "endpoint_url": "${CF_S3_ENDPOINT}"},
                },
            }
            from clipforge.flows import retrain_flow

            result = retrain_flow(recipe, tracking_uri=server)
            yield {"result": result, "s3": s3, "proxy": proxy, "server": server, "workdir": workdir}
    mlflow.tracking._tracking_service.utils._tracking_uri = None


def test_the_retrain_survives_injected_503s(retrained):
    result, proxy = retrained["result"], retrained["proxy"]
    assert result.register.version == "1" and result.register.promoted is True
    failed = proxy.failed
    print(f"proxy: {proxy.requests} requests, {len(failed)} answered 503 SlowDown")
    assert len(failed) >= 5
    assert any(line.startswith("PUT") for line in failed)
    assert {"aiobotocore", "Boto3"} <= {line.rsplit(" ", 1)[-1].split("/")[0] for line in failed}, failed  # store and server


def test_every_artifact_is_a_whole_object_on_s3(retrained):
    result, s3 = retrained["result"], retrained["s3"]
    objects = list_objects(s3, BUCKET)
    assert incomplete_uploads(s3, BUCKET) == []
    assert not [k for k in objects if ".tmp" in k or k.endswith("/")]
    run_dir = f"store/runs/{result.run_id}"
    keys = set(objects)
    store_keys = {k for k in keys if k.startswith("store/")}
    curated = result.curate.manifest_uri.removeprefix(f"s3://{BUCKET}/").rsplit("/", 1)[0]
    assert f"{curated}/manifest.parquet" in keys and f"{curated}/summary.json" in keys
    assert [k for k in store_keys if k.startswith(curated) and k.endswith(".tar")]
    assert f"{run_dir}/run.json" in keys and f"{run_dir}/evaluate/metrics.json" in keys
    assert [k for k in store_keys if "/checkpoints/step-" in k and k.endswith("/state.json")]
    assert f"{result.train.model_uri.removeprefix(f's3://{BUCKET}/')}/open_clip_model.safetensors" in keys
    mlflow_keys = {k for k in keys if k.startswith("mlflow/")}
    run = result.mlflow_run_id
    for name in ("recipe.yaml", "MODEL_CARD.md", "open_clip_model/open_clip_model.safetensors", "figures/loss_curve.png"):
        assert any(k.endswith(f"/{run}/artifacts/{name}") for k in mlflow_keys), name
    assert any("/models/m-" in k and k.endswith("/artifacts/MLmodel") for k in mlflow_keys)
    # every object is complete: its size is what S3 reports, and it parses as what it is
    for key, data in _contents(s3, objects).items():
        assert len(data) == objects[key], key
        if key.endswith(".safetensors"):
            with safe_open(_tmpfile(retrained, data), "pt") as f:
                assert list(f.keys()), key
        elif key.endswith(".json"):
            json.loads(data)
        elif key.endswith(".parquet"):
            assert pq.read_table(io.BytesIO(data)).num_rows > 0
        elif key.endswith(".tar"):
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                assert tar.getmembers(), key
    assert MlflowClient().get_run(run).data.tags["clipforge.storage"] == f"s3://{BUCKET}/store"


def test_credentials_never_reach_mlflow_prefect_logs_or_the_store(retrained, capfd):
    result, s3 = retrained["result"], retrained["s3"]
    client = MlflowClient()
    run = client.get_run(result.mlflow_run_id)
    texts = [json.dumps(run.data.params), json.dumps(run.data.tags), json.dumps(sorted(run.data.metrics))]
    texts.append(json.dumps(client.get_experiment(run.info.experiment_id).tags))
    texts.append(json.dumps(client.get_registered_model(MODEL).tags))
    for version in client.search_model_versions(f"name='{MODEL}'"):
        texts.append(json.dumps(version.tags))
        texts.append(version.source)
    texts += [json.dumps(m.to_dictionary(), default=str) for m in mlflow.search_logged_models(output_format="list")]
    assert "storage.root" in run.data.params and not [p for p in run.data.params if p.startswith("storage.options")]
    blobs = [t.encode() for t in texts]
    local = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(retrained["workdir"] / "dl")))
    blobs += [p.read_bytes() for p in local.rglob("*") if p.is_file()]
    assert (local / "recipe.yaml").read_text().count("${CF_S3_SECRET}") == 1  # the reference, not the value
    blobs += list(_contents(s3, list_objects(s3, BUCKET)).values())  # run.json, the MLflow artifacts, everything
    blobs += [_prefect_logs_and_parameters().encode(), (retrained["workdir"] / "mlflow-server.log").read_bytes()]
    captured = capfd.readouterr()
    blobs += [captured.out.encode(), captured.err.encode()]
    for secret in (SECRET_KEY, ACCESS_KEY):
        leaks = [i for i, blob in enumerate(blobs) if secret.encode() in blob]
        assert not leaks, f"{secret} found in {len(leaks)} logged values"
    assert len(blobs) > 50


def test_mlflow_models_serve_answers_with_the_champions_embeddings(retrained):
    """``mlflow models serve -m models:/NAME@champion --env-manager local`` and ``POST /invocations``."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # mlflow execs `uvicorn` from PATH, as in an activated environment
    env = {**os.environ, "MLFLOW_TRACKING_URI": retrained["server"], "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    args = [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}@champion", "--env-manager", "local"]
    images = [_png(color) for color in ("red", "navy", "green")]
    texts = ["a red circle", "two blue squares"]
    b64 = [base64.b64encode(i).decode() for i in images]
    frame = pd.DataFrame({"image": [b64[0], None, b64[1], None, b64[2]], "text": [None, texts[0], None, texts[1], None]})
    want = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion").predict(frame)
    payload = {"dataframe_split": json.loads(frame.to_json(orient="split", index=False))}
    with process(
        [*args, "-h", "127.0.0.1", "-p", str(port)], f"{url}/ping", retrained["workdir"] / "serve.log", env=env, timeout_s=120
    ):
        request = urllib.request.Request(
            f"{url}/invocations", data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as answer:
            served = np.asarray(json.loads(answer.read())["predictions"], dtype=np.float32)
        bad = urllib.request.Request(
            f"{url}/invocations",
            data=json.dumps({"dataframe_split": {"columns": ["image"], "data": [["bm90IGFuIGltYWdl"]]}}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(bad, timeout=60)
    assert served.shape == (5, TINY_RECIPE["model"]["config"]["embed_dim"])
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(served, want, atol=1e-5)
    assert refused.value.code in (400, 500) and b"cannot decode the image" in refused.value.read()


def _png(color: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _contents(s3: str, objects: dict[str, int]) -> dict[str, bytes]:
    import boto3

    client = boto3.client(
        "s3", endpoint_url=s3, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name="us-east-1"
    )
    return {key: client.get_object(Bucket=BUCKET, Key=key)["Body"].read() for key in objects}


def _tmpfile(retrained, data: bytes) -> str:
    path = retrained["workdir"] / "object.bin"
    path.write_bytes(data)
    return str(path)


def _prefect_logs_and_parameters() -> str:
    import asyncio

    from prefect.client.orchestration import get_client

    async def read() -> str:
        async with get_client() as client:
            logs = await client.read_logs()
            runs = await client.read_flow_runs()
        return "\n".join([log.message for log in logs] + [json.dumps(r.parameters, default=str) for r in runs])

    return asyncio.run(read())
