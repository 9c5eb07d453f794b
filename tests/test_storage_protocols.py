"""The store on any fsspec protocol (here an in-process one with injected failures), and which
errors count as transient: by type, HTTP status, error code and errno, never by their wording."""

from __future__ import annotations

import errno
import sqlite3

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from hypothesis import given
from hypothesis import strategies as st

from clipforge.core.retry import is_transient
from clipforge.core.storage import S3_RETRIES, Store, with_client_retries


class FlakyFileSystem(MemoryFileSystem):
    """An in-memory filesystem of its own protocol whose calls fail as ``faults`` says: per method
    name, the errors its next calls raise, one each."""

    protocol = "flaky"
    store: dict = {}  # noqa: RUF012 (MemoryFileSystem keeps its files on the class)
    pseudo_dirs = [""]  # noqa: RUF012
    faults: dict[str, list[BaseException]] = {}  # noqa: RUF012
    calls: dict[str, int] = {}  # noqa: RUF012

    def _fail(self, method: str) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1
        if self.faults.get(method):
            raise self.faults[method].pop(0)

    def cat_file(self, path, start=None, end=None, **kwargs):
        self._fail("cat_file")
        return super().cat_file(path, start=start, end=end, **kwargs)

    def _open(self, path, mode="rb", **kwargs):
        self._fail("open_write" if "w" in mode else "open_read")
        return super()._open(path, mode=mode, **kwargs)

    def info(self, path, **kwargs):
        self._fail("info")
        return super().info(path, **kwargs)

    def ls(self, path, detail=True, **kwargs):
        self._fail("ls")
        return super().ls(path, detail=detail, **kwargs)


class StatusError(Exception):
    """An HTTP client's error with nothing but a status, under the attribute name ``attr``."""

    def __init__(self, status: int, attr: str = "status_code", message: str = "the server answered"):
        super().__init__(message)
        if attr == "response":
            self.response = type("Response", (), {"status_code": status})()
        else:
            setattr(self, attr, status)


@pytest.fixture
def flaky(monkeypatch):
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
    FlakyFileSystem.store.clear()
    FlakyFileSystem.pseudo_dirs[:] = [""]
    FlakyFileSystem.faults.clear()
    FlakyFileSystem.calls.clear()
    monkeypatch.setattr("time.sleep", lambda s: None)
    return FlakyFileSystem


def test_a_store_on_another_protocol_writes_reads_lists_and_copies_folders(flaky, tmp_path):
    store = Store("flaky://bucket/prefix")
    assert store.url == "flaky://bucket/prefix" and isinstance(store.fs, FlakyFileSystem)
    assert store.write_json("a/b.json", {"x": 1}) == "flaky://bucket/prefix/a/b.json"
    assert store.sub("a").read_json("b.json") == {"x": 1}
    assert store.exists("a/b.json") and not store.exists("a/c.json")
    assert store.read_range("a/b.json", 2, 5) == b'{\n  "x": 1\n}'[2:5]
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "big.bin").write_bytes(bytes(range(256)) * 4096)
    (src / "sub" / "small.txt").write_text("small")
    store.put_dir(src, "dir")
    assert store.ls("dir") == ["big.bin", "sub"] and store.ls("nothing") == []
    out = store.get_dir("dir", tmp_path / "out")
    assert (out / "big.bin").read_bytes() == (src / "big.bin").read_bytes()
    assert (out / "sub" / "small.txt").read_text() == "small"
    with store.open("dir/big.bin") as f:
        f.seek(1000)
        assert f.read(10) == (bytes(range(256)) * 4096)[1000:1010]


def test_a_write_on_another_protocol_shows_whole_or_not_at_all(flaky):
    store = Store("flaky://bucket")
    with store.open_atomic("d/f.bin") as f:
        f.write(b"one")
        assert store.ls("d") != ["f.bin"]  # a file of the memory filesystem shows as soon as it is opened
        f.write(b"two")
    assert store.read_bytes("d/f.bin") == b"onetwo"
    with pytest.raises(RuntimeError, match="producer failed"), store.open_atomic("d/g.bin") as f:
        f.write(b"half")
        raise RuntimeError("producer failed")
    assert store.ls("d") == ["f.bin"]  # no g.bin, no temporary file


@pytest.mark.parametrize(
    "fault",
    [StatusError(503), StatusError(503, "status"), ConnectionResetError("reset by peer"), TimeoutError("timed out")],
    ids=["503-status_code", "503-status", "connection-reset", "timeout"],
)
def test_transient_failures_on_another_protocol_are_retried(flaky, fault):
    store = Store("flaky://bucket")
    flaky.faults["open_write"] = [fault]
    store.write_bytes("a.bin", b"data")
    flaky.faults.update(cat_file=[fault, fault], ls=[fault], info=[fault])
    assert store.read_bytes("a.bin") == b"data"
    assert store.ls() == ["a.bin"] and store.exists("a.bin")
    assert not any(flaky.faults.values())  # every injected failure was met, and got past


@pytest.mark.parametrize(
    "fault",
    [
        FileNotFoundError("gone"),
        StatusError(404),
        StatusError(403, "code"),
        PermissionError("denied"),
        ValueError("HTTP 500 from the proxy: Connection reset"),  # says "500", is no HTTP status
        OSError("wrote 1500 bytes but the store holds 1400"),
    ],
    ids=["not-found", "404", "403", "permission", "500-in-a-message", "500-in-an-oserror"],
)
def test_permanent_failures_on_another_protocol_are_not_retried(flaky, fault):
    store = Store("flaky://bucket")
    flaky.faults["open_write"] = [fault]
    with pytest.raises(type(fault)):
        store.write_bytes("a.bin", b"data")
    assert flaky.calls["open_write"] == 1


def test_client_retry_settings_go_where_the_protocol_takes_them():
    assert with_client_retries("s3", {"key": "k"}) == {"key": "k", "config_kwargs": {"retries": S3_RETRIES}}
    mine = {"config_kwargs": {"retries": {"max_attempts": 2}, "connect_timeout": 5}}
    assert with_client_retries("s3a", mine) == mine  # the user's own setting wins
    for protocol in ("gs", "gcs", "az", "abfs", "file", "memory", "flaky"):  # nothing their filesystems accept
        assert with_client_retries(protocol, {"token": "anon"}) == {"token": "anon"}


STATUS_ATTRS = st.sampled_from(["status", "status_code", "code", "response"])


@given(status=st.integers(400, 599), attr=STATUS_ATTRS, message=st.text())
def test_http_statuses_5xx_and_429_are_transient_other_4xx_not(status, attr, message):
    assert is_transient(StatusError(status, attr, message)) == (status >= 500 or status == 429)


@given(status=st.integers(400, 599), code=st.sampled_from(["NoSuchKey", "AccessDenied", "InvalidArgument"]))
def test_botocore_client_errors_by_status_and_throttling_codes(status, code):
    from botocore.exceptions import ClientError

    def error(code):
        return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op")

    assert is_transient(error(code)) == (status >= 500 or status == 429)
    assert is_transient(error("SlowDown")) and is_transient(error("ThrottlingException"))


def test_s3fs_translated_errors_are_told_by_their_cause():
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    def translated(code, status):
        return translate_boto_error(ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op"))

    assert is_transient(translated("InternalError", 500)) and is_transient(translated("SlowDown", 503))
    assert is_transient(translated("Unheard", 502))  # a plain OSError(EIO) whose cause is the 502
    assert not is_transient(translated("NoSuchKey", 404)) and not is_transient(translated("AccessDenied", 403))


TRANSIENT = [
    ConnectionResetError("reset"),
    TimeoutError("slow"),
    OSError(errno.EAGAIN, "try again"),
    OSError(errno.ETIMEDOUT, "timed out"),
    StatusError(503),
    StatusError(429, "status"),
]
PERMANENT = [
    FileNotFoundError("gone"),
    PermissionError("no"),
    StatusError(404),
    StatusError(400, "code"),
    OSError(errno.EIO, "i/o"),
]


def _wrapped(base: BaseException, wrappers: list[tuple[type[Exception], bool]]) -> BaseException:
    """``base`` raised from (or while handling) each wrapper in turn, innermost first."""
    error = base
    for cls, explicit in wrappers:
        try:
            try:
                raise error
            except BaseException as inner:
                if explicit:
                    raise cls("wrapped: 503 Service Unavailable, Connection reset") from inner
                raise cls("failed while handling another error: Timeout")  # noqa: B904 (the context is the link)
        except Exception as outer:
            error = outer
    return error


@given(
    base=st.sampled_from(TRANSIENT + PERMANENT),
    wrappers=st.lists(st.tuples(st.sampled_from([RuntimeError, ValueError, KeyError, OSError]), st.booleans()), max_size=4),
)
def test_a_wrapped_error_is_as_transient_as_what_it_wraps(base, wrappers):
    assert is_transient(_wrapped(base, wrappers)) == (base in TRANSIENT)


@given(cls=st.sampled_from([ValueError, RuntimeError, KeyError, TypeError, Exception]), message=st.text())
def test_no_message_makes_an_error_transient(cls, message):
    assert not is_transient(cls(message))
    assert not is_transient(cls(f"503 Service Unavailable: {message} Connection Timeout SlowDown"))


def test_an_error_raised_from_none_hides_what_it_was_handling():
    try:
        try:
            raise ConnectionResetError("reset")
        except ConnectionResetError:
            raise ValueError("a bad argument") from None
    except ValueError as e:
        assert not is_transient(e)


def test_library_errors_by_type():
    import aiohttp
    from botocore.exceptions import EndpointConnectionError, ReadTimeoutError, ResponseStreamingError

    assert is_transient(aiohttp.ServerDisconnectedError())
    assert is_transient(aiohttp.ClientPayloadError("Response payload is not completed"))
    assert is_transient(EndpointConnectionError(endpoint_url="http://x"))
    assert is_transient(ReadTimeoutError(endpoint_url="http://x"))
    assert is_transient(ResponseStreamingError(error="cut"))
    info = aiohttp.RequestInfo(url=__import__("yarl").URL("http://x"), method="GET", headers={}, real_url="http://x")
    assert is_transient(aiohttp.ClientResponseError(info, (), status=503))
    assert not is_transient(aiohttp.ClientResponseError(info, (), status=404))


def test_mlflow_errors_by_error_code():
    from mlflow.exceptions import MlflowException, RestException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, RESOURCE_EXHAUSTED, TEMPORARILY_UNAVAILABLE

    assert is_transient(MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE))
    assert is_transient(MlflowException("slow down", error_code=RESOURCE_EXHAUSTED))
    assert is_transient(RestException({"error_code": "503", "message": "unavailable"}))
    assert not is_transient(MlflowException("503 runs found", error_code=RESOURCE_DOES_NOT_EXIST))
    assert not is_transient(MlflowException("500 Internal Server Error"))  # INTERNAL_ERROR: MLflow's default says nothing
    try:
        try:
            raise ConnectionRefusedError("tracking server restarting")
        except ConnectionRefusedError as e:
            raise MlflowException(f"API request failed with exception {e}")  # noqa: B904 (as MLflow raises it)
    except MlflowException as e:
        assert is_transient(e)


def test_a_locked_sqlite_database_is_transient_other_sqlite_errors_not(tmp_path):
    import sqlalchemy

    holder = sqlite3.connect(tmp_path / "db.sqlite", timeout=0)
    holder.execute("create table t (x)")
    holder.commit()
    holder.execute("begin exclusive")
    other = sqlite3.connect(tmp_path / "db.sqlite", timeout=0)
    with pytest.raises(sqlite3.OperationalError) as locked:
        other.execute("insert into t values (1)")
    assert is_transient(locked.value)
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}", connect_args={"timeout": 0})
    with pytest.raises(sqlalchemy.exc.OperationalError) as wrapped, engine.begin() as conn:
        conn.execute(sqlalchemy.text("insert into t values (1)"))
    assert is_transient(wrapped.value)
    holder.rollback()
    with pytest.raises(sqlite3.OperationalError) as missing:
        other.execute("select * from missing")
    assert not is_transient(missing.value)
