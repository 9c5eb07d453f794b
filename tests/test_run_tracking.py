"""How a run's end is recorded in MLflow: a failure with its error, a resumed success without it."""

from __future__ import annotations

import mlflow
from mlflow import MlflowClient

from clipforge.registry import tracking as tracking_module


def test_a_run_resumed_to_success_no_longer_reads_as_failed(tracking):
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("resumed")).info.run_id
    try:
        raise RuntimeError("the store was unreachable")
    except RuntimeError as e:
        tracking_module.finish_run(run_id, e, "Traceback ...\nRuntimeError: the store was unreachable\n")
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["clipforge.error"] == "RuntimeError: the store was unreachable"
    assert "Traceback" in mlflow.artifacts.load_text(f"runs:/{run_id}/error.txt")

    tracking_module.mark_running(run_id)
    tracking_module.finish_run(run_id)  # the resumed run finished
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "clipforge.error" not in run.data.tags
    assert run.data.tags["clipforge.resumed_after"] == "RuntimeError: the store was unreachable"
    note = mlflow.artifacts.load_text(f"runs:/{run_id}/error.txt")
    assert "failed earlier" in note and "the store was unreachable" in note and "resumed" in note
    assert "Traceback" not in note

    tracking_module.finish_run(run_id)  # finishing again changes nothing
    assert client.get_run(run_id).data.tags["clipforge.resumed_after"] == "RuntimeError: the store was unreachable"
