"""``clipforge``: demo, run, evaluate, validate, plugins, schedule, data-arrived, promote, approve, rollback, schema.

Exit codes: 0 success, 1 a failed run, 2 bad input. Errors print as one message; ``--debug``
shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from clipforge.core.errors import ClipforgeError, ConfigError

if TYPE_CHECKING:
    from clipforge.core.recipe import Recipe
    from clipforge.core.stages import RetrainResult

console = Console(highlight=False, soft_wrap=True)  # commands and paths must stay copyable
err = Console(stderr=True, highlight=False)


def _recipe(path: str | Path | dict, overrides: list[str], workdir: Path | None = None):
    """The recipe at ``path``; with a ``workdir``, a relative local ``storage.root`` is taken under it."""
    from urllib.parse import urlparse

    from clipforge.core.validation import load_recipe

    recipe = load_recipe(path, overrides)  # validated here, once: the flows take it as it is
    root = recipe.storage.root
    if workdir is not None and len(urlparse(root).scheme) <= 1 and not Path(root).expanduser().is_absolute():
        storage = recipe.storage.model_copy(update={"root": str((workdir / root).resolve())})
        recipe = recipe.model_copy(update={"storage": storage})
    return recipe


FIND_HELP = (
    "the --workdir of the `clipforge demo`/`run` whose registry to use (its mlflow.db); default: "
    "MLFLOW_TRACKING_URI, else the .clipforge.json a demo or run left in this folder or one above it, "
    "else the last one recorded in the user's config folder"
)
WORKDIR_HELP = (
    "where this command keeps what it writes locally (default: %(default)s): the MLflow store "
    "(DIR/mlflow.db and DIR/mlartifacts; unless MLFLOW_TRACKING_URI is set) and the recipe's "
    "storage.root when that is a relative path (an absolute path or an s3:// URI is used as it is)"
)


def _tracking(workdir: Path) -> tuple[str, str | None]:
    """MLflow tracking URI and artifact root: the environment's, else a SQLite file in ``workdir``."""
    from clipforge.registry import default_tracking_uri

    uri = default_tracking_uri(workdir)
    artifact_root = None if os.environ.get("MLFLOW_TRACKING_URI") else str((workdir / "mlartifacts").resolve())
    return uri, artifact_root


def _reading_registry(workdir: str | None, model: str | None = None) -> str:
    """Point this process at the registry a reading command uses (never creating one); its URI.
    Where there is none, the error names the ``model`` the command was after."""
    from clipforge.registry import use_tracking_uri
    from clipforge.registry.location import RegistryNotFoundError, find_tracking

    try:
        location = find_tracking(workdir)
    except RegistryNotFoundError as e:
        raise RegistryNotFoundError(f"model {model!r}: {e}" if model else str(e)) from None
    use_tracking_uri(location.uri)
    return location.uri


def _preflight(recipe: Recipe, source: str, *, registry: bool) -> None:
    """Refuse (exit 2, every problem with its field path) what a run of ``recipe`` would fail on."""
    from clipforge.flows.preflight import check_before_run

    check_before_run(recipe, source, registry=registry)


def _model_references(recipe: Recipe) -> list[tuple[str, str]]:
    from clipforge.registry.references import model_references

    return list(model_references(recipe.as_dict()))


def _run_retrain(
    recipe: Recipe, *, run_id: str | None, stages: list[str], workdir: Path, source: str = "recipe"
) -> RetrainResult:
    from clipforge.flows import retrain_flow
    from clipforge.flows.stage import new_run_id
    from clipforge.registry import use_tracking_uri
    from clipforge.registry.location import TrackingLocation, record_tracking

    uri, artifact_root = _tracking(workdir)
    use_tracking_uri(uri)
    _preflight(recipe, source, registry=True)
    record_tracking(TrackingLocation(uri, artifact_root, str(workdir)), workdir)
    run_id = run_id or new_run_id()  # chosen here, so that a failure can name the command that resumes it
    try:
        return retrain_flow(recipe, run_id=run_id, stages=stages, tracking_uri=uri, artifact_root=artifact_root)
    except Exception as e:
        raise FailedRun(e, run_id) from e


class FailedRun(Exception):
    """A retrain that failed, with its run id: the command line prints how to resume it."""

    def __init__(self, error: Exception, run_id: str) -> None:
        super().__init__(str(error))
        self.error, self.run_id = error, run_id


def _report(result: RetrainResult, workdir: Path, seconds: float) -> None:
    from clipforge.core.results import CurateResult, EvaluateResult, RegisterResult, TrainResult
    from clipforge.registry import experiment_of, mlflow_ui_command, run_url

    evaluated = result.get(EvaluateResult)
    if evaluated and evaluated.metrics:
        table = Table(title="metrics", show_edge=False)
        table.add_column("metric")
        table.add_column("value", justify="right")
        for k, v in sorted(evaluated.metrics.items()):
            table.add_row(k, f"{v:.4f}")
        console.print(table)
    cur, tr, reg = result.get(CurateResult), result.get(TrainResult), result.get(RegisterResult)
    if cur:
        console.print(f"curated: {cur.kept:,} of {cur.input:,} pairs kept; manifest {cur.manifest_uri}")
        for step, counts in cur.funnel.items():
            for reason, n in counts.reasons.items():
                console.print(f"  dropped by {step}: {n:,} x {reason}")
    if tr:
        loss = f"{tr.final_loss:.4f}" if tr.final_loss is not None else "-"
        console.print(
            f"trained: {tr.steps} steps, final loss {loss}, {tr.samples_per_s} samples/s on {tr.device}; model {tr.model_uri}"
        )
    if reg:
        state = "champion" if reg.promoted else f"challenger (champion stays version {reg.previous_champion})"
        console.print(f"registered: {reg.model_name} version {reg.version} -> {state}")
        console.print(f"load it:  mlflow.pyfunc.load_model('models:/{reg.model_name}@champion')")
    uri = _tracking(workdir)[0]
    console.print(f"artifacts: {result.store}")
    console.print(f"registry:  export MLFLOW_TRACKING_URI={shlex.quote(uri)}   (for mlflow itself; clipforge finds it)")
    console.print(f"browse:    {mlflow_ui_command(uri)}")
    console.print(f"run:       {run_url(uri, experiment_of(result.mlflow_run_id), result.mlflow_run_id)}")
    console.print(f"done in {seconds:.0f} s (run {result.run_id})")


def cmd_demo(args) -> int:
    from clipforge.core.context import check_run_id
    from clipforge.core.recipe_yaml import builtin_recipe

    if args.run_id:
        check_run_id(args.run_id)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    recipe = _recipe(builtin_recipe("shapes"), args.set, workdir)
    console.print(f"clipforge demo: the built-in '{recipe.name}' recipe, everything under {workdir}")
    start = time.perf_counter()
    result = _run_retrain(recipe, run_id=args.run_id, stages=list(_stages("all")), workdir=workdir)
    _report(result, workdir, time.perf_counter() - start)
    return 0


def _stages(stage: str) -> tuple[str, ...]:
    from clipforge.core.stages import STAGES

    return tuple(STAGES) if stage == "all" else (stage,)


def cmd_run(args) -> int:
    from clipforge.core.context import check_run_id
    from clipforge.core.stages import STAGES

    if args.run_id:
        check_run_id(args.run_id)
    workdir = Path(args.workdir).resolve()
    recipe = _recipe(args.recipe, args.set, workdir)
    if args.stage != "all" and STAGES[args.stage].needs and not args.run_id:
        raise ConfigError(f"--stage {args.stage} continues an existing run: give its --run-id")
    start = time.perf_counter()
    result = _run_retrain(recipe, run_id=args.run_id, stages=list(_stages(args.stage)), workdir=workdir, source=args.recipe)
    _report(result, workdir, time.perf_counter() - start)
    return 0


def cmd_evaluate(args) -> int:
    from clipforge.core.resolver import MLFLOW_SCHEMES
    from clipforge.flows.evaluate import evaluate_uri
    from clipforge.registry.location import RegistryNotFoundError

    recipe = _recipe(args.recipe, args.set, Path(args.workdir or ".").resolve())
    try:
        _reading_registry(args.workdir)
    except RegistryNotFoundError:
        if args.model_uri.startswith(MLFLOW_SCHEMES):
            raise
        # a folder or store URI needs no registry (and none is created)
    evaluation = evaluate_uri(recipe, args.model_uri, device=args.device)
    metrics = evaluation.metrics
    table = Table(title=f"{args.model_uri} on {args.recipe}", show_edge=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        table.add_row(k, f"{v:.4f}")
    console.print(table)
    for where, skipped in evaluation.skipped.items():
        shown = ", ".join(f"{key} ({why})" for key, why in list(skipped.items())[:5])
        console.print(
            f"[yellow]{where}: {len(skipped)} samples skipped, not measured: {shown}{' ...' if len(skipped) > 5 else ''}"
        )
    if args.output:
        Path(args.output).write_text(json.dumps(metrics, indent=2))
        console.print(f"metrics written to {args.output}")
    return 0


def cmd_validate(args) -> int:
    recipe = _recipe(args.recipe, args.set)
    if not args.offline and any(ref.startswith("models:/") for _, ref in _model_references(recipe)):
        from clipforge.registry.location import RegistryNotFoundError

        try:
            _reading_registry(args.workdir)
        except RegistryNotFoundError as e:
            raise ConfigError(f"{args.recipe} names registered models, and {e} (--offline skips this check)") from None
    _preflight(recipe, args.recipe, registry=not args.offline)
    kinds = {kind for kind, _, _ in recipe.component_entries()}
    console.print(f"{args.recipe}: valid ({len(recipe.component_entries())} components of {len(kinds)} kinds)")
    return 0


def cmd_schema(args) -> int:
    from clipforge.core.recipe import Recipe

    console.print_json(json.dumps(Recipe.model_json_schema()))
    return 0


def cmd_plugins(args) -> int:
    from clipforge.core.plugins import get_plugin_manager

    pm = get_plugin_manager()
    catalog = pm.catalog  # built first: building fills each plugin's components
    infos = [i.as_dict() for i in pm.infos.values()]
    if args.json:
        print(json.dumps(infos, indent=2))
        return 0
    for i in infos:
        status = "[green]ok[/green]" if i["status"] == "ok" else f"[red]failed[/red]: {escape(i['error'])}"
        console.print(f"[bold]{i['name']}[/bold]  ({i['distribution']} {i['version']})  {status}")
        console.print(f"  hooks: {', '.join(i['hooks']) or '-'}")
        for kind, names in i["components"].items():
            console.print(f"  {kind}: {', '.join(names)}")
    console.print()
    from clipforge.core.kinds import KINDS

    for kind in KINDS:
        console.print(f"[bold]{kind}[/bold]: {', '.join(catalog.names(kind)) or '-'}")
    return 0


def cmd_schedule(args) -> int:
    from clipforge.flows import retrain_flow

    workdir = Path(args.workdir).resolve()
    recipe = _recipe(args.recipe, args.set, workdir)
    uri, artifact_root = _tracking(workdir)
    console.print(f"serving retrain of {args.recipe} on cron '{args.cron}' (Ctrl-C stops)")
    retrain_flow.serve(
        name=args.name or f"retrain-{recipe.name}",
        cron=args.cron,
        parameters={"recipe": recipe.as_dict(), "tracking_uri": uri, "artifact_root": artifact_root},
        global_limit=1,  # a run that comes due while the last one still trains waits for it
    )
    return 0


def cmd_data_arrived(args) -> int:
    from clipforge.flows.events import emit_data_arrived

    event = emit_data_arrived(args.location, args.stream)
    console.print(f"emitted {event.event} for {event.resource.id}: location {args.location} (event {event.id})")
    return 0


def cmd_promote(args) -> int:
    from clipforge.registry import set_champion

    _reading_registry(args.workdir, args.model)
    previous = set_champion(args.model, args.version, reason=args.reason, user=args.user)
    console.print(f"{args.model}: champion -> version {args.version} (was {previous or 'none'})")
    return 0


def cmd_rollback(args) -> int:
    from clipforge.registry import rollback

    _reading_registry(args.workdir, args.model)
    version = rollback(args.model, reason=args.reason, user=args.user)
    console.print(f"{args.model}: champion rolled back to version {version}")
    return 0


def cmd_tracking_uri(args) -> int:
    from clipforge.registry.location import find_tracking

    location = find_tracking(args.workdir)
    print(location.uri)  # alone on stdout: export MLFLOW_TRACKING_URI=$(clipforge tracking-uri)
    err.print(f"(from {location.source})", soft_wrap=True, markup=False)
    return 0


def cmd_approve(args) -> int:
    import getpass
    import socket

    from prefect.settings import PREFECT_API_URL

    from clipforge.flows.approval import FLOW_RUN_TAG, STATE_TAG, Approval, answer
    from clipforge.registry import tracking

    _reading_registry(args.workdir, args.model)
    tags = tracking.version_tags(args.model, args.version)
    if tags.get(STATE_TAG) != "pending" or not tags.get(FLOW_RUN_TAG):
        state = tags.get(STATE_TAG) or "never asked for"
        raise ConfigError(f"{args.model} version {args.version} is not waiting for approval (approval: {state})")
    if not PREFECT_API_URL.value():
        raise ConfigError("PREFECT_API_URL is not set: point it at the Prefect server the register flow is paused on")
    user = args.user or f"{getpass.getuser()}@{socket.gethostname()}"
    answer(tags[FLOW_RUN_TAG], Approval(approve=not args.reject, reason=args.reason or "", user=user))
    verb = "rejected" if args.reject else "approved"
    console.print(f"{args.model} version {args.version}: {verb}; the register flow run {tags[FLOW_RUN_TAG]} goes on")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from clipforge import __version__
    from clipforge.core.stages import STAGES

    p = argparse.ArgumentParser(prog="clipforge", description="Curate, train, evaluate and register CLIP-style models.")
    p.add_argument("--version", action="version", version=f"clipforge {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument(
        "--verbose", action="store_true", help="show every log line of Prefect and MLflow, not only clipforge's and warnings"
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(fn=fn)
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        sp.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help="show every log line")
        return sp

    def overrides(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field (repeatable)")

    def workdir(sp: argparse.ArgumentParser, default: str = ".") -> None:
        sp.add_argument("--workdir", default=default, metavar="DIR", help=WORKDIR_HELP)

    def registry_workdir(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--workdir", metavar="DIR", help=FIND_HELP)

    sp = add("demo", cmd_demo, "the whole retrain on the built-in shapes recipe, with nothing to start")
    workdir(sp, "clipforge-demo")
    sp.add_argument("--run-id", help="continue this demo run: completed stages are skipped")
    overrides(sp)
    sp = add("run", cmd_run, "run a recipe's stages as Prefect flows")
    sp.add_argument("recipe")
    sp.add_argument("--stage", default="all", choices=["all", *STAGES], help="one stage, or all of them in order (default: all)")
    sp.add_argument("--run-id", help="continue this run: completed stages are skipped")
    overrides(sp)
    workdir(sp)
    sp = add("evaluate", cmd_evaluate, "evaluate a registered model or a checkpoint on a recipe's evaluators, without training")
    sp.add_argument(
        "model_uri", metavar="MODEL_URI", help="models:/NAME@champion, models:/NAME/VERSION, an open_clip folder or a store URI"
    )
    sp.add_argument("--recipe", required=True, help="the recipe whose evaluation: section (and data.eval) to run")
    sp.add_argument("--device", help="default: the recipe's train.device")
    sp.add_argument("--output", help="also write the metrics to this JSON file")
    overrides(sp)
    registry_workdir(sp)
    sp = add(
        "validate",
        cmd_validate,
        "check a recipe, its components' parameters and what it names (files, columns, evaluation sets, storage, models)",
    )
    sp.add_argument("recipe")
    sp.add_argument("--offline", action="store_true", help="do not look the recipe's models up in the MLflow registry")
    registry_workdir(sp)
    overrides(sp)
    add("schema", cmd_schema, "print the JSON schema of recipes")
    sp = add("plugins", cmd_plugins, "list installed plugins, their hooks and components")
    sp.add_argument("--json", action="store_true")
    sp = add("schedule", cmd_schedule, "serve the retrain flow on a cron schedule from this machine")
    sp.add_argument("recipe")
    sp.add_argument("--cron", required=True)
    sp.add_argument("--name", help="deployment name (default retrain-<recipe name>)")
    overrides(sp)
    workdir(sp)
    sp = add(
        "data-arrived",
        cmd_data_arrived,
        "tell the Prefect server (PREFECT_API_URL) that new training data landed: triggered deployments retrain on it",
    )
    sp.add_argument("location", help="where the data is, as data.train takes it: shards, a brace pattern, a glob, a table")
    sp.add_argument("--stream", required=True, help="which data: the event's resource is clipforge.data.<stream>")
    sp = add("promote", cmd_promote, "move the champion alias to a version by hand")
    sp.add_argument("model")
    sp.add_argument("version")
    sp.add_argument("--reason", default="manual promotion", help="recorded in the version's tag promotion_reason")
    sp.add_argument("--user", help="recorded in the version's tag promoted_by (default: USER@HOST)")
    registry_workdir(sp)
    sp = add("approve", cmd_approve, "answer a promotion waiting for approval (registry.promote.approval)")
    sp.add_argument("model")
    sp.add_argument("version")
    sp.add_argument("--reject", action="store_true", help="refuse it: the champion stays, the version is tagged rejected")
    sp.add_argument("--reason", help="recorded in the version's tags")
    sp.add_argument("--user", help="who answers (default: USER@HOST)")
    registry_workdir(sp)
    sp = add("rollback", cmd_rollback, "move the champion alias back to the previous champion")
    sp.add_argument("model")
    sp.add_argument("--reason", default="manual rollback", help="recorded in the version's tags")
    sp.add_argument("--user", help="recorded in the version's tag promoted_by (default: USER@HOST)")
    registry_workdir(sp)
    sp = add("tracking-uri", cmd_tracking_uri, "print the MLflow tracking URI the registry commands use, and where it was found")
    registry_workdir(sp)
    return p


class _NoTraceback(logging.Filter):
    """Log records without their traceback: a failed flow or task run is told by clipforge's one message."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


PREFECT_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


class _Quiet(logging.Filter):
    """The terminal by default: clipforge's own lines, and anything at WARNING or above; not Prefect's
    INFO lines about every flow and task run, nor its copies of a failed run's error. Progress lines are left out on a terminal, where a
    progress bar says the same."""

    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def filter(self, record: logging.LogRecord) -> bool:
        from clipforge.flows.reporting import LINE, PROGRESS

        if record.levelno >= logging.ERROR and record.name.startswith(PREFECT_RUN_LOGGERS):
            return False  # a failed flow or task run: the command line prints its error once, itself
        if record.levelno >= logging.WARNING:
            return True
        return bool(getattr(record, LINE, False)) and not (self.tty and getattr(record, PROGRESS, False))


def _terminal(*, debug: bool, verbose: bool) -> None:
    """Prefect logs each failed flow and task run with its traceback: on the terminal, unless ``--debug``,
    only the message (the Prefect server's own log keeps the traceback). Unless ``--verbose``, the
    terminal shows clipforge's lines and warnings only (:class:`_Quiet`); the Prefect UI keeps every line."""
    from prefect.logging.configuration import setup_logging

    setup_logging()  # Prefect's handlers, which it would otherwise set up at the first flow run
    filters: list[logging.Filter] = ([] if debug else [_NoTraceback()]) + ([] if verbose else [_Quiet(sys.stderr.isatty())])
    for handler in logging.getLogger().handlers:
        for f in filters:
            if not any(type(g) is type(f) for g in handler.filters):
                handler.addFilter(f)
    if not verbose:  # MLflow's INFO lines (creating tables, validating the input example) have a handler of their own
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported (here, or by a worker)
        logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"])


FLOW_COMMANDS = ("demo", "run", "evaluate", "schedule")


def resume_command(argv: list[str], run_id: str) -> str:
    """The command line that continues a failed run: the one given, with ``--run-id`` set to its run."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--run-id":
            skip = True
        elif not arg.startswith("--run-id="):
            kept.append(arg)
    return shlex.join(["clipforge", *kept, "--run-id", run_id])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        if args.command in FLOW_COMMANDS:
            _terminal(debug=args.debug, verbose=args.verbose)
        return args.fn(args)
    except FailedRun as e:
        if args.debug:
            raise e.error from None
        code = _print_error(e.error)
        err.print(f"resume:  {resume_command(argv, e.run_id)}", soft_wrap=True, markup=False)
        return code
    except KeyboardInterrupt:
        err.print("interrupted")
        return 1
    except BrokenPipeError:  # `clipforge plugins --json | head`: the reader stopped reading
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - stays open while the interpreter flushes at exit
        return 0
    except Exception as e:
        if args.debug:
            raise
        return _print_error(e)


def _print_error(e: BaseException) -> int:
    """One message for ``e``; the exit code: 2 for bad input, else 1."""
    if isinstance(e, ConfigError):
        err.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True)
        return 2
    kind = "" if isinstance(e, ClipforgeError) else f"{type(e).__name__}: "
    err.print(f"[red]failed:[/red] {escape(kind + str(e))} (--debug shows the traceback)", soft_wrap=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
