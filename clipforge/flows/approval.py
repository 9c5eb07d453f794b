"""A person approves a promotion before ``champion`` moves (``registry.promote.approval: true``).

The register flow pauses with Prefect's ``pause_flow_run`` and a typed input (:class:`Approval`):
the Prefect UI shows the run as paused with a form, and ``clipforge approve MODEL VERSION [--reject
--reason R]`` answers it from anywhere that reaches the Prefect server, through
``resume_flow_run(..., run_input=...)``. The flow run's id is tagged on the version
(:data:`FLOW_RUN_TAG`), which is how ``clipforge approve`` finds it.

Pausing keeps the register flow's process waiting: it works for every flow run, deployed or not
(``clipforge run`` on a laptop as much as a worker's run). ``suspend_flow_run`` would end the process
instead, but the run is then re-executed from its start on resume, which needs a deployment and would
train again; the register stage's wait is cheap beside that.
"""

from __future__ import annotations

from typing import Any

from prefect.input import RunInput

from clipforge.core.errors import ConfigError

#: On the version: the paused register flow run waiting for an answer.
FLOW_RUN_TAG = "clipforge.approval.flow_run_id"
#: On the version: pending, approved or rejected; who answered and why.
STATE_TAG, BY_TAG, REASON_TAG = "clipforge.approval", "clipforge.approval.by", "clipforge.approval.reason"
#: Seconds between the paused flow's checks for an answer.
POLL_S = 2


class Approval(RunInput):
    """The answer to a promotion waiting for approval: approve (or reject) with a reason."""

    approve: bool = True
    reason: str = ""
    user: str = ""


def wait_for_approval(summary: str, timeout_s: int) -> Approval:
    """Pause the current flow run until a person answers; ``summary`` says what is asked (in the log)."""
    from prefect import get_run_logger
    from prefect.flow_runs import pause_flow_run

    get_run_logger().info("waiting for approval: %s (clipforge approve, or Resume in the Prefect UI)", summary)
    answer = pause_flow_run(wait_for_input=Approval, timeout=timeout_s, poll_interval=POLL_S, key="clipforge-approval")
    if not isinstance(answer, Approval):  # resumed without an input: Prefect fails the run before this
        raise ConfigError("the promotion was resumed without an answer")
    return answer


def current_flow_run_id() -> str:
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        raise ConfigError("registry.promote.approval pauses the register flow: it must run as a Prefect flow")
    return str(context.flow_run.id)


def answer(flow_run_id: str, approval: Approval) -> None:
    """Resume the paused register flow run with ``approval``; a clear error when it is not waiting."""
    from uuid import UUID

    from prefect.exceptions import FlowPauseTimeout, NotPausedError, ObjectNotFound
    from prefect.flow_runs import resume_flow_run

    try:
        resume_flow_run(UUID(flow_run_id), run_input=_input(approval))
    except NotPausedError:
        raise ConfigError(f"flow run {flow_run_id} is not waiting for approval (answered already, or it ended)") from None
    except FlowPauseTimeout:
        raise ConfigError(f"flow run {flow_run_id} waited for approval past its timeout; it can no longer be resumed") from None
    except ObjectNotFound:
        raise ConfigError(f"the Prefect server has no flow run {flow_run_id}: is PREFECT_API_URL the server it ran on?") from None


def _input(approval: Approval) -> dict[str, Any]:
    return approval.model_dump(include={"approve", "reason", "user"})
