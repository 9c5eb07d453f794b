"""Retrying what fails for a moment: a dropped connection, a timeout, throttling, a 5xx answer,
a database another process holds locked. One policy for the store and for MLflow.

An error is told by its type, the HTTP status or error code it carries and its errno, never by
its wording: a permanent error's message may well say "500" or "Connection". The first error of
its chain (``raise ... from``, or raised while handling another) that says either way decides.
"""

from __future__ import annotations

import errno
import functools
import http
import http.client
import logging
import random
import re
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast, overload

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])


class IncompleteBody(ConnectionError):
    """A read got fewer bytes than the object or range holds: the connection ended early."""


_TRANSIENT: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, http.client.IncompleteRead)
_PERMANENT: tuple[type[BaseException], ...] = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
#: dropped connections, timeouts and bodies cut short as the clients under fsspec's filesystems
#: (aiohttp, botocore, urllib3, requests, azure-core) and MLflow (requests) raise them, "module:Class"
_LIBRARY_TRANSIENT = (
    "aiohttp:ClientConnectionError",  # refused, reset, disconnected, timed out
    "aiohttp:ClientPayloadError",
    "aiohttp.http_exceptions:ContentLengthError",
    "aiohttp.http_exceptions:TransferEncodingError",
    "botocore.exceptions:ConnectionError",  # no connection to the endpoint, or none in time
    "botocore.exceptions:HTTPClientError",  # closed connections, read timeouts, a response stream cut short
    "botocore.exceptions:IncompleteReadError",
    "urllib3.exceptions:ProtocolError",
    "urllib3.exceptions:TimeoutError",
    "requests.exceptions:ConnectionError",
    "requests.exceptions:Timeout",
    "requests.exceptions:ChunkedEncodingError",
    "requests.exceptions:RetryError",  # urllib3 gave up on answers its retry policy calls transient
    "azure.core.exceptions:ServiceRequestError",
    "azure.core.exceptions:ServiceResponseError",
    "azure.core.exceptions:IncompleteReadError",
)
#: error codes of throttling and of servers busy for a moment: AWS's (botocore's "standard" retry
#: mode's list) and MLflow's
_TRANSIENT_CODES = frozenset(
    {"Throttling", "ThrottlingException", "ThrottledException", "RequestThrottledException", "TooManyRequestsException",
     "ProvisionedThroughputExceededException", "TransactionInProgressException", "RequestLimitExceeded",
     "BandwidthLimitExceeded", "LimitExceededException", "RequestThrottled", "SlowDown", "EC2ThrottledException",
     "RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete",
     "TEMPORARILY_UNAVAILABLE", "RESOURCE_EXHAUSTED", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}
)  # fmt: skip
_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("ECONNRESET", "ECONNABORTED", "ECONNREFUSED", "ETIMEDOUT", "EAGAIN", "EWOULDBLOCK", "EBUSY", "EINTR",
                 "EPIPE", "ENETDOWN", "ENETUNREACH", "ENETRESET", "EHOSTDOWN", "EHOSTUNREACH")
    if hasattr(errno, name)
)  # fmt: skip
_SQLITE_BUSY = (5, 6)  # SQLITE_BUSY ("database is locked"), SQLITE_LOCKED ("database table is locked")
_STATUS_LINE = re.compile(r"(\d{3}) ([^:\n]+)")
_REASONS = {s.value: s.phrase for s in http.HTTPStatus}


def _imported(names: tuple[str, ...]) -> tuple[type[BaseException], ...]:
    """The classes ``names`` of the modules already imported: an error of a library that nobody
    imported was never raised, so this imports none (they are optional)."""
    classes = []
    for name in names:
        module, _, attr = name.partition(":")
        cls = getattr(sys.modules.get(module), attr, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            classes.append(cls)
    return tuple(classes)


def _http_status(value: Any) -> int | None:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599 else None


def _status(e: BaseException) -> int | None:
    """The HTTP status ``e`` carries, by any of the names clients give it."""
    for attr in ("status", "status_code", "code"):  # in this order: aiohttp's "code" is a deprecated "status"
        if (status := _http_status(getattr(e, attr, None))) is not None:
            return status
    response = getattr(e, "response", None)
    if isinstance(response, dict):  # botocore's ClientError
        candidates = [response.get("ResponseMetadata", {}).get("HTTPStatusCode")]
    else:  # requests' HTTPError and the like
        candidates = [getattr(response, "status_code", None), getattr(response, "status", None)]
    # MLflow's: INTERNAL_ERROR (500) is what it says of any error it does not classify
    if getattr(e, "error_code", None) != "INTERNAL_ERROR" and callable(getattr(e, "get_http_status_code", None)):
        candidates.append(e.get_http_status_code())  # type: ignore[attr-defined]
    for candidate in candidates:
        if (status := _http_status(candidate)) is not None:
            return status
    if isinstance(e, OSError) and e.errno is None and e.args:
        # a bare OSError whose message is the answer's status line ("503 Service Unavailable"):
        # all that some filesystems pass on; the whole standard reason phrase, not a number in a sentence
        match = _STATUS_LINE.match(str(e.args[0]))
        if match and _REASONS.get(int(match[1])) == match[2].strip():
            return int(match[1])
    return None


def _error_code(e: BaseException) -> Any:
    response = getattr(e, "response", None)
    if isinstance(response, dict):  # botocore's ClientError
        return response.get("Error", {}).get("Code")
    return getattr(e, "error_code", None)  # MLflow's


def _sqlite_busy(e: BaseException) -> bool:
    """Whether ``e`` is SQLite's "database is locked": another connection holds the lock (SQLAlchemy's
    OperationalError wraps it as its cause)."""
    sqlite3 = sys.modules.get("sqlite3")
    if sqlite3 is None or not isinstance(e, sqlite3.OperationalError):
        return False
    code = getattr(e, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in _SQLITE_BUSY  # an extended code keeps the primary one in its low byte
    # Python 3.10's sqlite3 gives no code: only the message tells, and SQLite's own wording is fixed
    return str(e) in ("database is locked", "database table is locked")


def _verdict(e: BaseException) -> bool | None:
    """Whether ``e`` alone says it is transient (True), permanent (False), or neither (None)."""
    if isinstance(e, _PERMANENT):
        return False
    if isinstance(e, _TRANSIENT + _imported(_LIBRARY_TRANSIENT)) or _sqlite_busy(e):
        return True
    if _error_code(e) in _TRANSIENT_CODES:  # before the status: S3 answers RequestTimeout with a 400
        return True
    if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
        return True
    status = _status(e)
    if status is not None and status >= 400:
        return status >= 500 or status == 429
    return None


def _chain(e: BaseException | None) -> Iterator[BaseException]:
    """``e`` and the errors it was raised from or while handling, as a traceback shows them."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ if e.__cause__ is not None else None if e.__suppress_context__ else e.__context__


def is_transient(e: BaseException) -> bool:
    """Whether ``e`` is worth retrying: it says nothing about the request itself."""
    return next((v for v in map(_verdict, _chain(e)) if v is not None), False)


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
