"""A new user's first steps, end to end, on one tiny demo: the registry found from anywhere, a failed
run's terminal, and every shell and Python block of the docs run as pasted (or marked illustrative).

One module fixture runs ``clipforge demo`` once (version 1; version 2 registered from the same model) in a folder that stands for a
fresh clone; the tests then work from that folder, from inside the demo's workdir and from another
folder, with no ``MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from clipforge.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ILLUSTRATIVE = "<!-- illustrative -->"
TINY = [
    "--set", "data.train.size=200", "--set", "data.eval.size=60", "--set", "train.epochs=1",
    "--set", "evaluation=[{type: zero-shot-classification}, {type: retrieval, ks: [1, 5]}]",
]  # fmt: skip
EVAL = ["--set", "data.eval.size=40", "--set", "evaluation=[{type: retrieval, ks: [1]}]"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory, prefect_server):
    """A folder holding ``recipes/`` (a fresh clone's), in which the tiny demo ran twice; the user's config
    folder is this module's own."""
    import mlflow

    home = tmp_path_factory.mktemp("first-contact")
    clone, elsewhere = home / "clone", home / "elsewhere"
    (clone / "recipes").mkdir(parents=True)
    elsewhere.mkdir()
    (clone / "recipes" / "shapes.yaml").write_text((ROOT / "recipes" / "shapes.yaml").read_text())
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("XDG_CONFIG_HOME", str(home / "config"))
        mp.setenv("CLIPFORGE_LOCK_DIR", str(home / "locks"))
        mp.chdir(clone)
        assert main(["demo", *TINY]) == 0
        # a second version of the same model, so that promote and rollback have somewhere to go
        # (registered directly: a second demo would cost as much again)
        from mlflow import MlflowClient

        from clipforge.registry import register_version

        first = MlflowClient().get_model_version("shapes-clip", "1")
        metrics = {k.removeprefix("metric."): float(v) for k, v in first.tags.items() if k.startswith("metric.")}
        register_version(first.source, "shapes-clip", tags={}, metrics=metrics, run_id=None)
        yield clone, elsewhere
    mlflow.tracking._tracking_service.utils._tracking_uri = None


def _env(cwd: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["XDG_CONFIG_HOME"] = str(cwd.parent / "config")
    env["CLIPFORGE_LOCK_DIR"] = str(cwd.parent / "locks")
    return env


def test_the_registry_is_found_from_the_clone_from_the_demo_and_from_elsewhere(project, monkeypatch, capsys):
    """The README's commands, in three folders; which store they use is decided by where they stand only."""
    clone, elsewhere = project
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(clone.parent / "config"))
    recipe = str(clone / "recipes" / "shapes.yaml")
    for i, cwd in enumerate([clone, clone / "clipforge-demo", elsewhere]):
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        assert main(["evaluate", "models:/shapes-clip@champion", "--recipe", recipe, *EVAL]) == 0
        assert main(["promote", "shapes-clip", "2", "--reason", f"step {i}"]) == 0
        assert main(["rollback", "shapes-clip"]) == 0
        out = capsys.readouterr().out
        assert "retrieval/" in out and "champion -> version 2" in out and "rolled back to version 1" in out
    # no command left an empty store behind where it ran
    assert not any((p / "mlflow.db").exists() for p in (clone, elsewhere))


def test_the_retrain_flow_run_logs_each_stage_in_prefect(project):
    """The retrain's own flow run page in the Prefect UI tells its stages, not only its start and end."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, LogFilter, LogFilterFlowRunId

    async def read() -> list[list[str]]:
        async with get_client() as client:
            runs = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["retrain"])))
            out = []
            for run in runs:
                logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
                out.append([log.message for log in logs])
            return out

    per_run = [messages for messages in asyncio.run(read()) if any("shapes" in m for m in messages)]
    assert per_run
    for messages in per_run:
        for stage in ("curate", "train", "evaluate", "register"):
            assert f"{stage}: started" in messages and any(m.startswith(f"{stage}: finished in") for m in messages)


def test_reading_commands_say_where_they_looked_when_nothing_was_recorded(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.chdir(tmp_path)
    for args in (["promote", "shapes-clip", "1"], ["rollback", "shapes-clip"], ["tracking-uri"]):
        assert main(args) == 2
        err = capsys.readouterr().err.replace("\n", "")
        assert "no MLflow registry found" in err and "MLFLOW_TRACKING_URI" in err
        assert str(tmp_path / ".clipforge.json") in err and str(tmp_path / "config" / "clipforge") in err
    assert not (tmp_path / "mlflow.db").exists()


# -- the docs' code blocks --------------------------------------------------------------------


def code_blocks(path: Path) -> list[tuple[int, str, str, bool]]:
    """``(line, language, code, illustrative)`` of every ```bash and ```python block of a Markdown file."""
    blocks, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = re.fullmatch(r"```(bash|python)\s*", lines[i])
        if m:
            start, i = i, i + 1
            body = []
            while not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            before = next((ln for ln in reversed(lines[:start]) if ln.strip()), "")
            blocks.append((start + 1, m.group(1), "\n".join(body) + "\n", before.strip() == ILLUSTRATIVE))
        i += 1
    return blocks


def test_code_blocks_are_found_with_their_marks(tmp_path):
    doc = tmp_path / "d.md"
    doc.write_text("x\n\n<!-- illustrative -->\n```bash\nrm -rf /\n```\n\n```python\nprint(1)\n```\n```yaml\na: 1\n```\n")
    assert code_blocks(doc) == [(4, "bash", "rm -rf /\n", True), (8, "python", "print(1)\n", False)]


@pytest.mark.parametrize(
    "doc, line, language, code",
    [
        pytest.param(d.relative_to(ROOT).as_posix(), n, lang, c, id=f"{d.relative_to(ROOT).as_posix()}:{n}")
        for d in DOCS
        for n, lang, c, ill in code_blocks(d)
        if not ill
    ],
)
def test_every_code_block_of_the_docs_runs_as_pasted(project, doc, line, language, code, tmp_path):
    """Run from the clone where the demo ran, as the README's reader would, with the export line the demo printed."""
    clone, _ = project
    env = _env(clone)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{clone / 'clipforge-demo' / 'mlflow.db'}"
    env["MPLBACKEND"] = "Agg"
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "clipforge").write_text(f'#!/bin/sh\nexec {sys.executable} -m clipforge.cli "$@"\n')
    (shim / "clipforge").chmod(0o755)
    env["PATH"] = f"{shim}{os.pathsep}{env['PATH']}"
    cmd = ["bash", "-euo", "pipefail", "-c", code] if language == "bash" else [sys.executable, "-c", code]
    ran = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, f"{doc}:{line} fails as pasted (mark it {ILLUSTRATIVE} if it cannot run):\n{ran.stderr[-3000:]}"
