"""``mlflow models serve`` of a clipforge model: good requests in every JSON layout, bad ones answered
with 400 and clipforge's own message."""

from __future__ import annotations

import base64
import json
import os
import random
import urllib.error
import urllib.request

import mlflow
import numpy as np
import pandas as pd
import pytest

from clipforge.registry import log_pyfunc_model
from tests.services import BIN, free_port, process
from tests.test_registry import model_dir, png  # noqa: F401 (model_dir is a fixture)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(model_dir, tmp_path_factory):  # noqa: F811
    """The tiny model logged to a SQLite store and served by ``mlflow models serve``: (url, in-process model)."""
    work = tmp_path_factory.mktemp("serve")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.create_experiment("serving", artifact_location=(work / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            info = log_pyfunc_model(model_dir)
        local = mlflow.pyfunc.load_model(info.model_uri)
    finally:
        mlflow.set_tracking_uri(previous)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # mlflow execs `uvicorn` from PATH, as in an activated environment
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    args = [str(BIN / "mlflow"), "models", "serve", "-m", info.model_uri, "--env-manager", "local"]
    with process([*args, "-h", "127.0.0.1", "-p", str(port)], f"{url}/ping", work / "serve.log", env=env, timeout_s=180):
        yield url, local


def post(url: str, payload: object) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{url}/invocations", data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_every_json_layout_gets_one_embedding_per_row_in_order(served):
    url, local = served
    rng = random.Random(0)
    for n in (1, 3, 17):
        rows = [{"image": b64(png(i))} if rng.random() < 0.5 else {"text": f"a shape number {i}"} for i in range(n)]
        frame = pd.DataFrame(rows, columns=["image", "text"])
        want = local.predict(frame)
        layouts = {
            "dataframe_split": json.loads(frame.to_json(orient="split", index=False)),
            "dataframe_records": rows,
            # MLflow turns `instances` into columns, which needs every key in every row
            "instances": [{"image": row.get("image"), "text": row.get("text")} for row in rows],
        }
        for layout, data in layouts.items():
            status, answer = post(url, {layout: data})
            assert status == 200, (layout, answer)
            got = np.asarray(answer["predictions"], dtype=np.float32)
            assert got.shape == (n, 64), layout
            np.testing.assert_allclose(got, want, atol=1e-5, err_msg=layout)
    # a table of texts only, as a dict of columns
    status, answer = post(url, {"inputs": {"text": ["a red circle", "a blue square"]}})
    assert status == 200 and np.asarray(answer["predictions"]).shape == (2, 64)


def _with_bad_row(bad: dict, position: int, n: int) -> dict:
    """``n`` good rows with ``bad`` at ``position``, as ``dataframe_split``."""
    rows: list[list[str | None]] = [[b64(png(i)), None] if i % 2 else [None, f"caption {i}"] for i in range(n)]
    rows.insert(position, [bad.get("image"), bad.get("text")])
    return {"dataframe_split": {"columns": ["image", "text"], "data": rows}}


BAD_ROWS = {
    "not base64": ({"image": "this is not base64!"}, r"row {row}: cannot decode the image: it is not base64 text \("),
    "not an image": (
        {"image": b64(b"not an image")},
        r"row {row}: cannot decode the image: its 12 bytes are not an image file of a known format",
    ),
    "both": ({"image": b64(png(0)), "text": "a cat"}, r"row {row} has both an image and a text; give one per row"),
    "neither": ({}, r"row {row} has neither an image nor a text"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
@pytest.mark.parametrize(("position", "n"), [(0, 0), (2, 3), (5, 7)])
def test_a_bad_row_is_answered_400_with_clipforge_s_message(served, case, position, n):
    import re

    url, _ = served
    bad, pattern = BAD_ROWS[case]
    status, answer = post(url, _with_bad_row(bad, position, n))
    assert status == 400
    assert answer["error_code"] == "INVALID_PARAMETER_VALUE"
    assert re.fullmatch(pattern.format(row=position) + ".*", answer["message"]), answer["message"]
    # the sentence alone: no stack trace, no server paths, not the request echoed back
    assert set(answer) == {"error_code", "message"}
    assert len(answer["message"]) < 300 and "/site-packages/" not in answer["message"]


@pytest.mark.parametrize("columns", [["caption"], ["images", "txt"], ["Image"]])
def test_a_wrong_column_is_told_which_columns_it_sent(served, columns):
    url, _ = served
    status, answer = post(url, {"dataframe_split": {"columns": columns, "data": [["x"] * len(columns)]}})
    assert status == 400
    assert answer == {
        "error_code": "INVALID_PARAMETER_VALUE",
        "message": f"input needs a column 'image' and/or 'text'; got columns {columns}",
    }


def test_the_model_card_documents_what_the_server_does(served, model_dir):  # noqa: F811
    """The card's request example is answered, and each error it lists is the server's own."""
    from clipforge.registry import render_model_card

    url, _ = served
    card = render_model_card(model_name="m", recipe_yaml="name: m", metrics={}, lineage={}, version="1", embed_dim=64)
    for layout in ('{"dataframe_split": {"columns": ["image", "text"], "data": [[null, "a cat"]]}}',
                   '{"dataframe_records": [{"text": "a cat"}]}', '{"inputs": {"text": ["a cat"]}}',
                   '{"instances": [{"text": "a cat"}]}'):  # fmt: skip
        assert layout in card
        status, answer = post(url, json.loads(layout))
        assert status == 200 and len(answer["predictions"][0]) == 64
    assert "one L2-normalized float32 embedding of 64 numbers per" in card
    status, answer = post(url, {"dataframe_split": {"columns": ["caption"], "data": [["a cat"]]}})
    assert f"`{answer['message']}`" in card


def test_bad_rows_raise_the_same_message_in_process(served):
    """Loaded with ``mlflow.pyfunc.load_model``, the model raises what the server answers (a ValueError too)."""
    from mlflow.exceptions import MlflowException

    url, local = served
    for bad, _ in BAD_ROWS.values():
        payload = _with_bad_row(bad, 1, 2)
        frame = pd.DataFrame(payload["dataframe_split"]["data"], columns=["image", "text"])
        with pytest.raises(MlflowException) as raised:
            local.predict(frame)
        # the class of the model's own code, which MLflow loads under a module name of its own
        assert type(raised.value).__name__ == "BadInput" and isinstance(raised.value, ValueError)
        assert post(url, payload)[1]["message"] == raised.value.reason
