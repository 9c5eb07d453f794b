"""Events that start retrains: ``clipforge.data.arrived`` says where new training data landed.

A crawl, an export or a labelling job emits it when its shards are complete (``clipforge
data-arrived LOCATION --stream NAME``, :func:`emit_data_arrived`, or Prefect's own ``prefect event
emit``); a deployment trigger that expects it (``deployments/prefect.yaml``) runs the retrain with
the event's location as the flow's ``data_location`` parameter. The event's resource names the
stream of data (``clipforge.data.<stream>``), so that each deployment reacts to its own crawl.
"""

from __future__ import annotations

import re
from typing import Any

from clipforge.core.errors import ConfigError

DATA_ARRIVED = "clipforge.data.arrived"
_STREAM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def data_resource(stream: str) -> dict[str, str]:
    """The Prefect resource of a stream of data, which deployment triggers ``match``."""
    if not _STREAM.match(stream):
        raise ConfigError(f"stream {stream!r}: use letters, digits, '.', '_' and '-', starting with a letter or digit")
    return {"prefect.resource.id": f"clipforge.data.{stream}", "prefect.resource.name": stream}


def emit_data_arrived(location: str, stream: str, payload: dict[str, Any] | None = None) -> Any:
    """Tell the Prefect server that new data of ``stream`` is complete at ``location`` (what a
    recipe's ``data.train`` location takes: shards, a brace pattern, a glob, a table); returns the
    event once the server has it. ``payload`` adds fields to the event's payload beside ``location``.
    """
    from prefect.events import Event
    from prefect.events.clients import get_events_client
    from prefect.settings import PREFECT_API_URL
    from prefect.utilities.asyncutils import run_coro_as_sync

    if not location.strip():
        raise ConfigError("the data's location is empty")
    if not PREFECT_API_URL.value():  # Prefect would start a server of its own that no deployment listens to
        raise ConfigError("PREFECT_API_URL is not set: point it at the Prefect server whose deployments should retrain")
    event = Event(event=DATA_ARRIVED, resource=data_resource(stream), payload={**(payload or {}), "location": location})

    async def send() -> None:  # sent before returning: a short-lived process must not exit with it queued
        async with get_events_client() as client:
            await client.emit(event)

    run_coro_as_sync(send())
    return event


# -- what the register stage decided ---------------------------------------------------------------

#: The register stage moved ``champion`` to the new version.
MODEL_PROMOTED = "clipforge.model.promoted"
#: The register stage left ``champion`` where it was (the rule, a guard, or a person refused).
MODEL_REFUSED = "clipforge.model.refused"


def model_resource(name: str, version: str) -> dict[str, str]:
    """The Prefect resource of a registered model's version, which automations and triggers ``match``."""
    return {
        "prefect.resource.id": f"clipforge.model.{name}",
        "prefect.resource.name": name,
        "clipforge.model.version": str(version),
    }


def emit_promotion(name: str, version: str, promoted: bool, payload: dict[str, Any]) -> Any:
    """Tell Prefect what the register stage decided on ``name`` ``version`` (:data:`MODEL_PROMOTED` or
    :data:`MODEL_REFUSED`): the payload holds the metric, its delta and interval, the reason and the
    guard that refused. Returns the event (None where no events client is configured)."""
    from prefect.events import emit_event

    return emit_event(
        event=MODEL_PROMOTED if promoted else MODEL_REFUSED,
        resource=model_resource(name, version),
        payload={"model": name, "version": str(version), **payload},
    )
