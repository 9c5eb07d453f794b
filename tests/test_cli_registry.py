"""``clipforge promote`` and ``clipforge rollback``: move ``champion`` by hand, recording who and why."""

from __future__ import annotations

import getpass
import socket
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from clipforge.cli import main
from clipforge.registry import promote_if_better, register_version

MODEL = "cli-clip"
METRIC = "retrieval/mean_recall@1"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """The CLI's own SQLite store in ``--workdir``; the test reaches it through the same URI."""
    # mlflow.set_tracking_uri (which the CLI calls) also sets the variable: monkeypatch restores it
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("CLIPFORGE_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)
    monkeypatch.setattr(mlflow.tracking._model_registry.utils, "_registry_uri", None)
    for value in (0.5, 0.7, 0.6):
        version = register_version("models/any", MODEL, tags={}, metrics={METRIC: value}, run_id=None)
        promote_if_better(MODEL, version.version, metric=METRIC)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the CLI finds the store through --workdir
    monkeypatch.chdir(tmp_path)  # and the helpers below through the same URI, explicitly
    yield str(tmp_path)


def client() -> MlflowClient:
    uri = f"sqlite:///{Path.cwd() / 'mlflow.db'}"  # the test's working directory is its --workdir
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def champion() -> str:
    return str(client().get_model_version_by_alias(MODEL, "champion").version)


def tags(version: str) -> dict[str, str]:
    return client().get_model_version(MODEL, version).tags


def test_promote_and_rollback_record_who_and_why(workdir, capsys):
    assert champion() == "2"
    assert main(["promote", MODEL, "3", "--reason", "better on the new holdout", "--user", "alice", "--workdir", workdir]) == 0
    assert "champion -> version 3 (was 2)" in capsys.readouterr().out
    assert champion() == "3"
    assert tags("3")["promoted_by"] == "alice"
    assert tags("3")["promotion_reason"] == "better on the new holdout"
    assert tags("3")["previous_champion"] == "2"

    assert main(["rollback", MODEL, "--reason", "regression in production", "--workdir", workdir]) == 0
    assert "rolled back to version 2" in capsys.readouterr().out
    assert champion() == "2"
    assert tags("2")["promoted_by"] == f"{getpass.getuser()}@{socket.gethostname()}"
    assert tags("2")["promotion_reason"] == "regression in production (from v3)"
    assert tags("3")["rolled_back"] == "regression in production"


def test_promote_and_rollback_refuse_what_does_not_exist(workdir, capsys):
    assert main(["promote", MODEL, "9", "--workdir", workdir]) == 2
    assert "cli-clip has no version '9'" in capsys.readouterr().err
    assert main(["rollback", MODEL, "--workdir", workdir]) == 0  # v2 displaced v1, which had no predecessor
    assert main(["rollback", MODEL, "--workdir", workdir]) == 2
    assert "has no previous champion" in capsys.readouterr().err
    assert champion() == "1"


def test_promote_and_rollback_restate_each_version_and_when(workdir):
    before = tags("2")["promoted_at"]
    assert main(["promote", MODEL, "3", "--reason", "holdout", "--user", "alice", "--workdir", workdir]) == 0
    assert main(["rollback", MODEL, "--reason", "regressed", "--user", "bob", "--workdir", workdir]) == 0
    v2, v3 = (client().get_model_version(MODEL, v) for v in ("2", "3"))
    assert v2.tags["promoted_by"] == "bob" and v2.tags["promoted_at"] > before  # when it became champion again
    assert v2.description.startswith("**Champion again** (rolled back from v3 by bob") and "regressed" in v2.description
    assert v3.description.startswith("**Rolled back** (champion is v2 again; by bob") and v3.description.count("**") == 2


def test_reasons_give_metrics_to_six_digits():
    from clipforge.registry.promotion import _verdict

    judged = _verdict(METRIC, {METRIC: 0.5008333325386047}, "1", {METRIC: 0.6000000238418579}, "max", 0.0, [])
    promoted, reason = judged.better, judged.reason
    assert not promoted and "=0.500833 " in reason and "=0.6)" in reason


def test_a_retrain_s_experiment_opens_as_model_training(tracking):
    from clipforge.registry import ensure_experiment

    experiment = MlflowClient().get_experiment(ensure_experiment("kind"))
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
