"""Real services for tests: a moto S3 server, a fault-injecting proxy in front of it, an MLflow server."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

BIN = Path(sys.executable).parent

#: Dummy credentials moto accepts; the secret is distinctive so that tests can search for it.
ACCESS_KEY = "AKIACLIPFORGETEST0001"
SECRET_KEY = "cf-secret-9f3b27d1e6a84c0b"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before answering {url}:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s")


@contextmanager
def process(
    args: list[str], url: str, log: Path, *, env: dict[str, str] | None = None, timeout_s: float = 60
) -> Iterator[subprocess.Popen]:
    """Start ``args`` in its own process group, wait until ``url`` answers; stop the group afterwards."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_http(url, timeout_s, proc, log)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@contextmanager
def moto_s3(log_dir: Path) -> Iterator[str]:
    """A moto S3 server on a free port; yields its endpoint URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with process([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], url, log_dir / "moto.log"):
        yield url


class FaultProxy(ThreadingHTTPServer):
    """An HTTP proxy to ``upstream`` that answers every ``every``-th request with 503 SlowDown (0: none)
    and cuts the body of every ``cut_every``-th GET answer halfway, closing the connection after the
    first half as a dropped connection would (0: none)."""

    daemon_threads = True

    def __init__(self, upstream: str, every: int = 10, cut_every: int = 0):
        self.upstream = urlsplit(upstream)
        self.every, self.cut_every = every, cut_every
        self.lock = threading.Lock()
        self.requests = self.bodies = 0
        self.failed: list[str] = []
        self.cut: list[str] = []
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def should_fail(self, line: str) -> bool:
        with self.lock:
            self.requests += 1
            fail = bool(self.every) and self.requests % self.every == 0
            if fail:
                self.failed.append(line)
            return fail

    def should_cut(self, line: str) -> bool:
        with self.lock:
            self.bodies += 1
            cut = bool(self.cut_every) and self.bodies % self.cut_every == 0
            if cut:
                self.cut.append(line)
            return cut

    @contextmanager
    def running(self) -> Iterator[FaultProxy]:
        thread = threading.Thread(target=self.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.shutdown()
            self.server_close()


_SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FaultProxy

    def log_message(self, *args) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self) -> None:
        body = self._body()
        agent = (self.headers.get("User-Agent") or "-").split()[0]  # which client: aiobotocore, Boto3...
        if self.server.should_fail(f"{self.command} {self.path} {agent}"):
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(_SLOW_DOWN)))
            self.end_headers()
            self.wfile.write(_SLOW_DOWN)
            return
        up = self.server.upstream
        conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        conn.request(self.command, self.path, body=body, headers=headers)
        answer = conn.getresponse()
        data = answer.read()
        conn.close()
        self.send_response(answer.status, answer.reason)
        head = self.command == "HEAD"  # no body: the upstream's Content-Length is the object's size
        for key, value in answer.getheaders():
            if key.lower() not in _HOP_BY_HOP and (head or key.lower() != "content-length"):
                self.send_header(key, value)
        if not head:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if head:
            return
        if self.command == "GET" and len(data) > 1 and self.server.should_cut(f"{self.command} {self.path}"):
            self.wfile.write(data[: len(data) // 2])  # the promised length, half of it sent: then the connection drops
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward


def create_bucket(endpoint: str, bucket: str) -> None:
    import boto3

    s3 = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name="us-east-1"
    )
    s3.create_bucket(Bucket=bucket)


def list_objects(endpoint: str, bucket: str) -> dict[str, int]:
    """Every key of ``bucket`` and its size, read straight from S3 (not through any proxy)."""
    import boto3

    s3 = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name="us-east-1"
    )
    out: dict[str, int] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        out.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
    return out


def incomplete_uploads(endpoint: str, bucket: str) -> list[str]:
    import boto3

    s3 = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name="us-east-1"
    )
    return [u["Key"] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


@contextmanager
def mlflow_server(workdir: Path, s3_endpoint: str, artifacts: str) -> Iterator[str]:
    """An MLflow tracking server (SQLite backend, one worker) proxying artifacts to ``artifacts`` on S3."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    args = [
        str(BIN / "mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{workdir / 'mlflow-server.db'}",
        "--artifacts-destination", artifacts,
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    with process(args, f"{url}/health", workdir / "mlflow-server.log", env=env, timeout_s=120):
        yield url


@contextmanager
def mlflow_ui_server(backend_store_uri: str, log: Path) -> Iterator[str]:
    """An MLflow server (the UI and its API; one worker, no job runner) on a store as it is, on a free port."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    args = [
        str(BIN / "mlflow"), "server", "--backend-store-uri", backend_store_uri,
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    with process(args, f"{url}/health", log, env=env, timeout_s=120):
        yield url
