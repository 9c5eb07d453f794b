"""docs/plugins.md documents every hook as specified, every hook has a test, and the page's examples work.

"As specified" means: hookspecs.py is the one source. Each reference entry documents the hook's
arguments, opens with its docstring's summary, and names every call its docstring names
(``launch(job, device)``) as the docstring does.

"Has a test" means: some test module implements the hook with ``@hookimpl`` and a signature
pluggy accepts (so the implementation can be registered and called), and, for a lifecycle
hook, the package really calls it somewhere. A hook added to hookspecs.py without all of that
fails here.
"""

from __future__ import annotations

import ast
import inspect
import re
import types
from pathlib import Path

import pytest

import clipforge
from clipforge.core import hookspecs
from clipforge.core.kinds import KINDS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "plugins.md"


def hook_specs() -> dict[str, list[str]]:
    """Every hook of hookspecs.py and its argument names."""
    return {
        name: list(inspect.signature(fn).parameters)
        for name, fn in vars(hookspecs).items()
        if callable(fn) and hasattr(fn, f"{hookspecs.PROJECT}_spec")
    }


def reference_sections(text: str) -> dict[str, tuple[list[str], str]]:
    """The hook reference's ``### `name(args)` `` sections: the documented arguments and the body."""
    reference = text.split("\n## Hook reference\n", 1)[1]
    sections = {}
    for match in re.finditer(r"^### `(\w+)\(([^)]*)\)`\n(.*?)(?=^### |^## |\Z)", reference, re.M | re.S):
        name, args, body = match.groups()
        sections[name] = ([a.strip() for a in args.split(",") if a.strip()], body)
    return sections


def hook_docstrings() -> dict[str, str]:
    return {name: inspect.getdoc(getattr(hookspecs, name)) or "" for name in hook_specs()}


def markdown(rst: str) -> str:
    """reST as the page writes it, on one line: ``:class:`~clipforge.X``` and ````x```` become ```clipforge.X``` and ```x```."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", rst).replace("``", "`")
    return " ".join(text.split())


def docstring_problems(docstrings: dict[str, str], sections: dict[str, tuple[list[str], str]]) -> list[str]:
    """Each entry opens with its hook's summary (the docstring's first paragraph) and names its calls."""
    problems = []
    for name, doc in docstrings.items():
        if name not in sections:
            continue  # reported by reference_problems
        body = sections[name][1].strip()
        summary = markdown(doc.split("\n\n", 1)[0])
        if markdown(body.split("\n\n", 1)[0]) != summary:
            problems.append(f"{name}: the entry does not open with the docstring's summary {summary!r}")
        flat = " ".join(body.split())
        for call in (" ".join(c.split()) for c in re.findall(r"``(\w+\([^()`]*\))", doc)):
            if f"`{call}" not in flat:  # the page may go on with the return type, as the docstring does
                problems.append(f"{name}: the docstring's {call} is not in the entry")
    return problems


def reference_problems(specs: dict[str, list[str]], sections: dict[str, tuple[list[str], str]]) -> list[str]:
    problems = [f"{name}: no reference entry" for name in specs if name not in sections]
    problems += [f"{name}: documented but not a hook" for name in sections if name not in specs]
    for name, args in specs.items():
        if name not in sections:
            continue
        documented, body = sections[name]
        if documented != args:
            problems.append(f"{name}: documented as ({', '.join(documented)}), specified as ({', '.join(args)})")
        for field in ("**When:**", "**Arguments:**", "**Returns:**"):
            if field not in body:
                problems.append(f"{name}: no {field} line")
        arguments = body.split("**Arguments:**", 1)[-1].split("**Returns:**", 1)[0]
        problems += [f"{name}: argument {a!r} is not described" for a in args if f"`{a}`" not in arguments]
    return problems


def test_every_hook_has_a_reference_entry_matching_its_spec():
    assert reference_problems(hook_specs(), reference_sections(DOCS.read_text())) == []


def test_every_reference_entry_says_what_its_docstring_says():
    assert docstring_problems(hook_docstrings(), reference_sections(DOCS.read_text())) == []


def test_the_docstring_check_catches_a_stale_summary_or_call():
    docstrings = hook_docstrings()
    sections = reference_sections(DOCS.read_text())
    docstrings["register_launchers"] = docstrings["register_launchers"].replace("launch(job, device)", "launch(job)")
    args, body = sections["before_stage"]
    sections["before_stage"] = (args, body.replace("Called before", "Runs before", 1))
    assert docstring_problems(docstrings, sections) == [
        "register_launchers: the docstring's launch(job) is not in the entry",
        "before_stage: the entry does not open with the docstring's summary "
        "'Called before a stage (a row of `clipforge.STAGES`: its name) starts.'",
    ]


def test_the_reference_check_catches_a_missing_or_stale_entry():
    specs = hook_specs()
    sections = reference_sections(DOCS.read_text())
    del sections["after_evaluation"]
    sections["after_train_step"] = (["context", "step"], sections["after_train_step"][1])
    body = sections["before_stage"][1].replace("`stage`", "the stage")
    sections["before_stage"] = (specs["before_stage"], body)
    assert sorted(reference_problems(specs | {"after_checkpoint": ["context", "path"]}, sections)) == [
        "after_checkpoint: no reference entry",
        "after_evaluation: no reference entry",
        "after_train_step: documented as (context, step), specified as (context, step, metrics)",
        "before_stage: argument 'stage' is not described",
    ]


# -- every hook has a test ------------------------------------------------------------------


def _is_hookimpl(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return (isinstance(target, ast.Name) and target.id == "hookimpl") or (
        isinstance(target, ast.Attribute) and target.attr == "hookimpl"
    )


def implemented_hooks(sources: dict[str, str], specs: dict[str, list[str]]) -> dict[str, list[str]]:
    """For each hook, the test modules that implement it with a signature pluggy would register."""
    found: dict[str, list[str]] = {name: [] for name in specs}
    for path, source in sources.items():
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name not in specs:
                continue
            if not any(_is_hookimpl(d) for d in node.decorator_list):
                continue
            args = [a.arg for a in node.args.args if a.arg != "self"]
            if set(args) <= set(specs[node.name]) and path not in found[node.name]:
                found[node.name].append(path)
    return found


def called_hooks(sources: dict[str, str]) -> set[str]:
    """Hooks the package calls as ``<...>.hook.<name>(...)`` or ``hook.<name>(...)``."""
    return {
        node.func.attr
        for source in sources.values()
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and (
            (isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "hook")
            or (isinstance(node.func.value, ast.Name) and node.func.value.id == "hook")  # hook = pm.hook
        )
    }


def _sources(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text() for p in sorted(folder.rglob("*.py"))}


def unimplemented_hooks(tests: dict[str, str], package: dict[str, str]) -> list[str]:
    specs = hook_specs()
    problems = [f"{name}: no test implements it" for name, paths in implemented_hooks(tests, specs).items() if not paths]
    calls = called_hooks(package)
    for name in specs:
        if name.startswith("register_"):
            if name.removeprefix("register_") not in KINDS:  # the plugin manager calls one per kind
                problems.append(f"{name}: no component kind {name.removeprefix('register_')!r}")
        elif name not in calls:
            problems.append(f"{name}: clipforge never calls it")
    return problems


def test_every_hook_has_a_test_and_is_called():
    assert unimplemented_hooks(_sources(ROOT / "tests"), _sources(ROOT / "clipforge")) == []


def test_the_test_check_catches_an_untested_or_uncalled_hook():
    tests = _sources(ROOT / "tests")
    package = _sources(ROOT / "clipforge")
    # without the test modules that implement before_stage, it is untested
    without = {p: s for p, s in tests.items() if "def before_stage(" not in s}
    assert "before_stage: no test implements it" in unimplemented_hooks(without, package)
    # an implementation with an argument the hook lacks cannot be registered: it does not count
    wrong = {"t.py": "import clipforge\n@clipforge.hookimpl\ndef after_stage(stage, context, outcome):\n    pass\n"}
    assert implemented_hooks(wrong, hook_specs())["after_stage"] == []
    # a hook nobody calls is dead
    unwired = {p: s.replace("hook.after_evaluation(", "hook_after_evaluation(") for p, s in package.items()}
    assert unimplemented_hooks(tests, unwired) == ["after_evaluation: clipforge never calls it"]


# -- the page's examples --------------------------------------------------------------------


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def _run(code: str, name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    exec(compile(code, f"docs/plugins.md:{name}", "exec"), module.__dict__)
    return module


def test_the_example_loss_registers_and_conforms(fresh_plugins):
    from clipforge.testing import check_component

    plugin = _run(_python_blocks(DOCS.read_text())[0], "clipforge_mine")
    fresh_plugins().add_plugin(plugin, "mine")
    loss = check_component("losses", "mine-smoothed-clip", {"smoothing": 0.05})
    plain = check_component("losses", "mine-smoothed-clip", {"smoothing": 0.0})
    assert loss > plain  # smoothing raises the loss of the same, mostly matched, features
    with pytest.raises(clipforge.RecipeError, match="smoothing"):
        check_component("losses", "mine-smoothed-clip", {"smoothing": 1.5})


def test_the_notification_example_writes_a_line_and_never_fails(tmp_path, monkeypatch, fresh_plugins):
    (code,) = [b for b in _python_blocks(DOCS.read_text()) if "after_model_registered" in b]
    plugin = _run(code, "clipforge_notify")
    pm = fresh_plugins()
    pm.add_plugin(plugin, "notify")
    assert pm.infos["notify"].hooks == ["after_model_registered"]
    context = types.SimpleNamespace(
        run_id="20260101-000000-abcdef", state=types.SimpleNamespace(register=types.SimpleNamespace(promoted=True))
    )
    version = types.SimpleNamespace(name="shapes-clip", version="3")
    log = tmp_path / "chat.log"
    monkeypatch.setenv("CLIPFORGE_NOTIFY_FILE", str(log))
    pm.hook.after_model_registered(context=context, model_version=version)
    context.state.register.promoted = False
    pm.hook.after_model_registered(context=context, model_version=types.SimpleNamespace(name="shapes-clip", version="4"))
    lines = log.read_text().splitlines()
    assert [line.split(" ", 2)[2] for line in lines] == [
        "shapes-clip version 3 is the new champion (run 20260101-000000-abcdef)",
        "shapes-clip version 4 is a challenger (run 20260101-000000-abcdef)",
    ]
    monkeypatch.setenv("CLIPFORGE_NOTIFY_FILE", str(tmp_path / "no-such-folder" / "chat.log"))
    pm.hook.after_model_registered(context=context, model_version=version)  # logs a warning, does not raise
