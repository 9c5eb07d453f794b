"""What a run tells people while it runs: its lines, its progress, its Prefect artifacts.

- :func:`say`: a line of clipforge's, in the flow run's logs (the Prefect UI) and on the terminal.
  The record is marked (:data:`LINE`), so that the command line can show clipforge's lines and
  Prefect's warnings and leave out Prefect's own chatter about every task.
- :class:`Progress`: a long piece of work as a Prefect progress artifact that moves, and a log line
  at a sensible rate (every tenth of the work, at most :data:`LINE_EVERY_S` apart, and at the end).
  Those lines are also marked :data:`PROGRESS`: on a terminal a progress bar says the same, and
  the command line leaves them out there.
- :func:`publish`: an artifact of a stage, reachable from the retrain run too: it is created on the
  outermost flow run (the retrain) under its key, and, when the stage runs as a subflow, on the
  stage's own run without a key (so that the Artifacts page lists it once).
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, cast
from uuid import UUID

#: Log record attributes: a line of clipforge's; a progress line (a bar says the same on a terminal).
LINE, PROGRESS = "clipforge_line", "clipforge_progress"
#: A long piece of work logs a line at least this often (seconds), besides every tenth of it.
LINE_EVERY_S = 300.0
#: Its progress artifact is updated at most this often (seconds): each update is a call to the API.
UPDATE_EVERY_S = 1.0

_fallback = logging.getLogger("clipforge.flows")


def run_logger() -> logging.Logger | logging.LoggerAdapter[Any]:
    """The Prefect run logger of the current flow run (its records carry the run's id, so it may be
    used from other threads); outside a run, a plain logger."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return _fallback


def say(message: str, *, progress: bool = False, logger: logging.Logger | logging.LoggerAdapter[Any] | None = None) -> None:
    """Log ``message`` as clipforge's line of the current run (a progress line with ``progress``)."""
    (logger or run_logger()).info(message, extra={LINE: True, PROGRESS: progress})


def in_flow_run() -> bool:
    from prefect.context import FlowRunContext

    return FlowRunContext.get() is not None


class Progress:
    """A Prefect progress artifact ``key`` and periodic lines for work of ``total`` units.

    Outside a flow run it only logs. :meth:`update` may be called as often as wanted: the artifact
    is updated at most every :data:`UPDATE_EVERY_S`, a line logged every tenth of the work.
    """

    def __init__(self, key: str, description: str, total: int) -> None:
        from prefect.artifacts import create_progress_artifact

        self.key, self.description, self.total = key, description, max(total, 1)
        self.logger = run_logger()
        self.artifact: UUID | None = None
        if in_flow_run():
            self.artifact = cast(UUID, create_progress_artifact(0.0, key=key, description=description))
        self.sent = self.logged_at = 0.0
        self.tenth = 0
        self.done = 0

    @property
    def percent(self) -> float:
        return min(100.0, 100.0 * self.done / self.total)

    def update(self, done: int, line: str | None, *, total: int | None = None) -> None:
        """``done`` units of the work are done; ``line`` says so in words, logged when a line is due (no
        lines without it: the caller says what it does itself)."""
        if total:
            self.total = max(total, 1)
        self.done = done
        now = time.monotonic()
        if self.artifact is not None and (now - self.sent >= UPDATE_EVERY_S or done >= self.total):
            self._send()
            self.sent = now
        tenth = int(10 * self.done / self.total)
        if line is not None and (tenth > self.tenth or now - self.logged_at >= LINE_EVERY_S):
            self.tenth = max(tenth, self.tenth)
            self.logged_at = now
            say(line, progress=True, logger=self.logger)

    def _send(self) -> None:
        from prefect.artifacts import update_progress_artifact

        if self.artifact is not None:
            update_progress_artifact(self.artifact, self.percent)

    def finish(self) -> None:
        """The work is over: the artifact at 100 %."""
        self.done = self.total
        self._send()


class FileWatcher:
    """Polls ``read()`` every ``every_s`` seconds in a thread and hands what it finds to ``seen``,
    until :meth:`stop`: how a flow follows work that reports through a file on the store (a
    training launched in other processes, maybe on other machines)."""

    def __init__(self, read: Callable[[], Any], seen: Callable[[Any], None], every_s: float = 1.0) -> None:
        self.read, self.seen, self.every_s = read, seen, every_s
        self.stopped = threading.Event()
        # the flow run's context (its Prefect client settings, its logger) in the thread as well
        context = contextvars.copy_context()
        self.thread = threading.Thread(target=context.run, args=(self._run,), name="clipforge-progress", daemon=True)

    def __enter__(self) -> FileWatcher:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join()
        self._poll()  # what was written last

    def _run(self) -> None:
        while not self.stopped.wait(self.every_s):
            self._poll()

    def _poll(self) -> None:
        try:
            found = self.read()
        except Exception as e:  # a progress report must never fail the work it reports on
            _fallback.debug("progress: cannot read the report (%s)", e)
            return
        if found is not None:
            self.seen(found)


def publish(kind: str, key: str, description: str, **data: Any) -> None:
    """Create a Prefect artifact of ``kind`` (``table``, ``markdown``, ``link``) for this flow run and
    the outermost one (see the module's docstring); outside a flow run, nothing."""
    from prefect.artifacts import LinkArtifact, MarkdownArtifact, TableArtifact
    from prefect.runtime import flow_run

    if not in_flow_run():
        return
    cls: Any = {"table": TableArtifact, "markdown": MarkdownArtifact, "link": LinkArtifact}[kind]
    here, root = str(flow_run.id), str(flow_run.root_flow_run_id or flow_run.id)
    cls(key=key, description=description, flow_run_id=UUID(root), **data).create()
    if here != root:
        cls(key=None, description=description, flow_run_id=UUID(here), **data).create()
