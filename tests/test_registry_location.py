"""Where the registry is: recorded by demo/run, found by the reading commands from any folder, never created."""

from __future__ import annotations

import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clipforge.cli import main, resume_command
from clipforge.registry.location import (
    STATE_FILE,
    RegistryNotFoundError,
    TrackingLocation,
    find_tracking,
    local_store,
    record_tracking,
)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return tmp_path


def _store(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mlflow.db").write_bytes(b"")  # an existing file is all the lookup asks of it
    return local_store(folder)


@settings(max_examples=15, deadline=None)
@given(depth=st.integers(0, 4), inside=st.booleans())
def test_the_nearest_record_wins_from_any_depth_then_the_user_s(tmp_path_factory, depth, inside):
    base = tmp_path_factory.mktemp("p")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("XDG_CONFIG_HOME", str(base / "config"))
        project, other = base / "project", base / "other"
        here = (project if inside else other).joinpath(*[f"d{i}" for i in range(depth)])
        here.mkdir(parents=True)
        last = _store(base / "last")
        record_tracking(last, base / "last")  # the user's record: the last demo or run
        mine = _store(project)
        (project / STATE_FILE).write_text(json.dumps({"tracking_uri": mine.uri, "artifact_root": mine.artifact_root}))
        found = find_tracking(start=here)
        assert found.uri == (mine.uri if inside else last.uri)
        assert find_tracking(base / "last", start=here).uri == last.uri  # an explicit --workdir before any record


def test_the_environment_comes_first_and_a_server_is_not_checked(home, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert find_tracking(start=home) == TrackingLocation("http://mlflow.example:5000", None, "MLFLOW_TRACKING_URI")


def test_nothing_found_says_where_it_looked_and_creates_nothing(home):
    (home / "w").mkdir()
    with pytest.raises(RegistryNotFoundError) as e:
        find_tracking(start=home / "w")
    message = str(e.value)
    assert str(home / "w" / STATE_FILE) in message and str(home / "config" / "clipforge" / "tracking.json") in message
    assert "MLFLOW_TRACKING_URI" in message
    with pytest.raises(RegistryNotFoundError, match="no such file"):
        find_tracking(home / "w")  # a --workdir without a store
    assert not list(home.rglob("mlflow.db"))


def test_a_record_whose_store_is_gone_is_refused(home):
    location = _store(home / "demo")
    record_tracking(location, home / "demo")
    (home / "demo" / "mlflow.db").unlink()
    with pytest.raises(RegistryNotFoundError, match="no such file"):
        find_tracking(start=home / "demo")


def test_tracking_uri_prints_the_uri_alone(home, monkeypatch, capsys):
    location = _store(home / "demo")
    record_tracking(location, home / "demo")
    monkeypatch.chdir(home)
    assert main(["tracking-uri"]) == 0
    out = capsys.readouterr()
    assert out.out == location.uri + "\n" and "tracking.json" in out.err


@given(
    args=st.lists(st.sampled_from(["--set", "train.epochs=1", "--workdir", "d", "--run-id", "old", "--run-id=x"]), max_size=6),
    run_id=st.from_regex(r"[0-9]{8}-[0-9]{6}-[a-f0-9]{6}", fullmatch=True),
)
def test_the_resume_command_names_the_run_once(args, run_id):
    command = resume_command(["run", "r.yaml", *args], run_id).split()
    assert command[:3] == ["clipforge", "run", "r.yaml"] and command[-2:] == ["--run-id", run_id]
    assert command.count("--run-id") == 1 and not any(a.startswith("--run-id=") for a in command)


def test_plugins_json_into_a_closed_pipe_ends_quietly(monkeypatch, capsys):
    class Closed(io.StringIO):
        def write(self, s):
            raise BrokenPipeError

    monkeypatch.setattr("sys.stdout", Closed())
    assert main(["plugins", "--json"]) == 0
    assert "Traceback" not in capsys.readouterr().err
