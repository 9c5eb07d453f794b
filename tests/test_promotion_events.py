"""The register stage against a real Prefect server: it emits clipforge.model.promoted / refused, and
with ``registry.promote.approval`` it pauses until `clipforge approve` answers."""

from __future__ import annotations

import datetime
import threading
import time

import pytest
from mlflow import MlflowClient

from clipforge.cli import main
from clipforge.flows.approval import FLOW_RUN_TAG, STATE_TAG
from clipforge.flows.events import MODEL_PROMOTED, MODEL_REFUSED


def _events(name: str, kind: str, since: datetime.datetime, version: str, timeout: float = 30.0) -> list:
    """The events of ``kind`` about version ``version`` of model ``name`` the server has since ``since``
    (they are ingested asynchronously; the session's server also holds other tests' events about a
    model of that name)."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter

    wanted = EventFilter(
        event=EventNameFilter(name=[kind]),
        resource=EventResourceFilter(id=[f"clipforge.model.{name}"]),
        occurred=EventOccurredFilter(since=since),
    )
    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:
            found = [e for e in client.read_events(filter=wanted, limit=50).events if e.payload.get("version") == version]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def _retrain_in_thread(recipe, tracking):
    from clipforge.flows import retrain_flow

    outcome: dict = {}

    def run():
        try:
            outcome["result"] = retrain_flow(recipe, tracking_uri=tracking)
        except BaseException as e:  # handed to the test
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def _pending(model: str, version: str, thread, timeout: float = 240.0) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and thread.is_alive():
        try:
            tags = MlflowClient().get_model_version(model, version).tags
        except Exception:  # not registered yet
            tags = {}
        if tags.get(STATE_TAG) == "pending":
            return tags
        time.sleep(1)
    raise AssertionError(f"{model} v{version} never waited for approval")


@pytest.mark.slow
def test_approval_pauses_the_register_flow_until_clipforge_approve_answers(tiny_recipe, tracking, prefect_server, tmp_path):
    model = tiny_recipe["registry"]["model_name"]
    tiny_recipe["registry"]["promote"]["approval"] = True
    tiny_recipe["train"]["epochs"] = 1
    tiny_recipe["data"]["train"]["size"] = 64
    tiny_recipe["data"]["eval"]["size"] = 24
    workdir = ["--workdir", str(tmp_path)]
    since = datetime.datetime.now(datetime.timezone.utc)

    # a person rejects the first version: no champion, the version says who and why, a refused event
    thread, outcome = _retrain_in_thread(tiny_recipe, tracking)
    tags = _pending(model, "1", thread)
    assert tags[FLOW_RUN_TAG]
    assert main(["approve", model, "1", "--reject", "--reason", "numbers look off", "--user", "reviewer", *workdir]) == 0
    thread.join(120)
    assert "error" not in outcome, outcome.get("error")
    decision = outcome["result"].register
    assert not decision.promoted and "rejected by reviewer: numbers look off" in decision.reason
    version = MlflowClient().get_model_version(model, "1")
    assert version.tags[STATE_TAG] == "rejected" and "champion" not in MlflowClient().get_registered_model(model).aliases
    refused = _events(model, MODEL_REFUSED, since, "1")
    assert refused and refused[0].payload["version"] == "1" and "rejected by reviewer" in refused[0].payload["reason"]
    assert main(["approve", model, "1", *workdir]) == 2  # answered already: a clear error, exit 2

    # the next one is approved: it takes champion, and the promoted event says so
    thread, outcome = _retrain_in_thread(tiny_recipe, tracking)
    _pending(model, "2", thread)
    assert main(["approve", model, "2", "--reason", "ship it", "--user", "reviewer", *workdir]) == 0
    thread.join(120)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"].register.promoted
    assert str(MlflowClient().get_registered_model(model).aliases["champion"]) == "2"
    promoted = _events(model, MODEL_PROMOTED, since, "2")
    assert promoted and promoted[0].payload["version"] == "2"
    assert promoted[0].payload["metric"] == "eval/retrieval/mean_recall@1"
    assert promoted[0].resource.id == f"clipforge.model.{model}" and promoted[0].resource["clipforge.model.version"] == "2"

    # the same model again, gated at a confidence: a delta of nothing is noise, refused with its interval
    tiny_recipe["registry"]["promote"].update(approval=False, confidence=0.95)
    from clipforge.flows import retrain_flow

    again = retrain_flow(tiny_recipe, tracking_uri=tracking).register
    assert not again.promoted and "the gain may be noise" in again.reason
    assert again.interval is not None and again.interval["delta"] == 0 and again.interval["n"] == 24
    refused = _events(model, MODEL_REFUSED, since, "3")
    assert refused and refused[0].payload["interval"]["confidence"] == 0.95


def test_the_deployment_triggered_by_a_promotion_evaluates_the_promoted_version():
    """deployments/prefect.yaml's shapes-champion-suite: its trigger matches what the register stage emits
    for the weekly recipe's model, and hands the promoted version to the flow it runs."""
    import inspect
    from pathlib import Path

    import yaml
    from prefect.flows import load_flow_from_entrypoint

    from clipforge.core.validation import load_recipe
    from clipforge.flows.events import model_resource

    root = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((root / "deployments" / "prefect.yaml").read_text())
    deployment = next(d for d in config["deployments"] if d["name"] == "shapes-champion-suite")
    (trigger,) = deployment["triggers"]
    assert trigger["expect"] == [MODEL_PROMOTED]
    weekly = load_recipe(root / "deployments" / "recipes" / "shapes-weekly.yaml")
    assert trigger["match"] == {"prefect.resource.id": model_resource(weekly.model_name, "1")["prefect.resource.id"]}
    assert trigger["parameters"]["model"] == "models:/{{ event.payload.model }}/{{ event.payload.version }}"
    flow = load_flow_from_entrypoint(str(root / deployment["entrypoint"]))
    assert set(deployment["parameters"]) | {"model"} <= set(inspect.signature(flow.fn).parameters)
    load_recipe(root / deployment["parameters"]["recipe_path"])
