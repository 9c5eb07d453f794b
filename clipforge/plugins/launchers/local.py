"""``local``: the training in the flow's own process, on one device (the default)."""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel, ConfigDict

import clipforge


class LocalParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Local:
    """In this process, on one device."""

    def launch(self, job: Callable[[], object], device: str) -> None:
        job()


@clipforge.hookimpl
def register_launchers(register):
    register("local", Local, params=LocalParams, description="in the flow's own process, on one device")
