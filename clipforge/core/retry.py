"""Retrying what fails for a moment: a dropped connection, a timeout, throttling, a 5xx answer,
a database another process holds locked. One policy for the store and for MLflow."""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast, overload

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])


class IncompleteBody(ConnectionError):
    """A read got fewer bytes than the object or range holds: the connection ended early."""


_TRANSIENT: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)
# a body that ended early, as aiohttp (under s3fs), urllib3/http.client (under botocore, MLflow) and botocore say it
_CUT_SHORT = {"ClientPayloadError", "ContentLengthError", "TransferEncodingError", "IncompleteRead", "ResponseStreamingError",
              "ProtocolError", "ChunkedEncodingError"}  # fmt: skip
_PERMANENT: tuple[type[BaseException], ...] = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
# what object stores (s3fs, botocore, aiohttp) and MLflow say of throttling, 5xx answers and dropped connections
_TRANSIENT_TEXT = ("503", "500", "502", "504", "SlowDown", "Throttl", "Timeout", "Connection", "database is locked")


def is_transient(e: BaseException) -> bool:
    """Whether ``e`` is worth retrying: it says nothing about the request itself."""
    if isinstance(e, _TRANSIENT):
        return True
    if isinstance(e, _PERMANENT):
        return False
    if any(cls.__name__ in _CUT_SHORT for cls in type(e).__mro__):
        return True
    text = f"{type(e).__name__} {e}"
    return any(s in text for s in _TRANSIENT_TEXT)


@overload
def retry(fn: F) -> F: ...
@overload
def retry(*, attempts: int = 5, base_delay: float = 0.2) -> Callable[[F], F]: ...
def retry(fn: F | None = None, *, attempts: int = 5, base_delay: float = 0.2) -> F | Callable[[F], F]:
    """Retry ``fn`` on transient errors (:func:`is_transient`) with jittered exponential backoff.

    ``@retry`` or ``@retry(attempts=..., base_delay=...)``.
    """

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for attempt in range(1, attempts + 1):
                try:
                    return fn(*args, **kwargs)
                except Exception as e:
                    if attempt == attempts or not is_transient(e):
                        raise
                    delay = base_delay * 2 ** (attempt - 1) * (1 + random.random())
                    log.warning("%s failed (%s); retry %d/%d in %.1fs", fn.__name__, e, attempt, attempts - 1, delay)
                    time.sleep(delay)
            raise AssertionError("unreachable")  # the last attempt returned or raised

        return cast(F, wrapper)

    return decorate(fn) if fn is not None else decorate
