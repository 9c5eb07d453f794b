"""The artifact store: a folder on the local disk or an S3 prefix, through fsspec.

Every write is atomic (nothing half-written is ever visible under its final name) and checked
by size; transient errors are retried with exponential backoff.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem

from clipforge.core.retry import retry
from clipforge.core.secrets import resolve_env_refs

#: botocore's "standard" retry mode retries 5xx answers, throttling (SlowDown) and connection errors
#: with jittered exponential backoff; the Store's own :func:`retry` wraps whole operations on top.
S3_RETRIES = {"max_attempts": 8, "mode": "standard"}


def _with_s3_retries(options: dict[str, Any]) -> dict[str, Any]:
    """S3 options with botocore retries set, unless the user's ``config_kwargs`` already sets them."""
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("retries", S3_RETRIES)
    return {**options, "config_kwargs": config}


class Store:
    """Relative paths under ``root`` on any fsspec filesystem."""

    def __init__(self, root: str, options: dict[str, Any] | None = None):
        # the recipe's options, ${ENV_VAR} references unresolved: what sub() passes on
        self.options = dict(options or {})
        resolved = resolve_env_refs(self.options)
        if urlsplit(root).scheme in ("s3", "s3a"):
            resolved = _with_s3_retries(resolved)
        self.fs, path = fsspec.core.url_to_fs(root, **resolved)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root = str(Path(path).resolve()) if self.local else path.rstrip("/")
        self.url = self.root if self.local else self.fs.unstrip_protocol(self.root)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def path(self, *parts: str) -> str:
        """The filesystem path of a relative path (no protocol)."""
        for p in parts:
            if ".." in p.split("/") or p.startswith("/"):
                raise ValueError(f"store paths are relative and stay under the root: {p!r}")
        return posixpath.join(self.root, *parts)

    def uri(self, *parts: str) -> str:
        """A URI another process can open (a local path, or ``s3://...``)."""
        return self.path(*parts) if self.local else self.fs.unstrip_protocol(self.path(*parts))

    def sub(self, *parts: str) -> Store:
        return Store(self.uri(*parts), self.options)

    @retry
    def exists(self, rel: str) -> bool:
        self.fs.invalidate_cache(self.path(rel))  # s3fs answers from cached listings otherwise
        return self.fs.exists(self.path(rel))

    @retry
    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    @retry
    def read_range(self, rel: str, start: int, end: int) -> bytes:
        """Bytes ``start`` to ``end`` (exclusive) of ``rel``, in one ranged read; a body that ends early is retried."""
        if self.local:
            with open(self.path(rel), "rb") as f:
                f.seek(start)
                data = f.read(end - start)
            if len(data) != end - start:
                raise OSError(f"{self.uri(rel)}: {len(data)} of {end - start} bytes at {start}: the file is shorter")
            return data
        data = self.fs.cat_file(self.path(rel), start=start, end=end)
        if len(data) != end - start:  # a connection dropped mid-body: worth another try
            raise ConnectionError(f"{self.uri(rel)}: the body ended after {len(data)} of {end - start} bytes at {start}")
        return bytes(data)

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    @retry
    def write_bytes(self, rel: str, data: bytes) -> str:
        """Write ``data`` under ``rel`` atomically; return its URI."""
        with self.open_atomic(rel) as f:
            f.write(data)
        return self.uri(rel)

    @contextlib.contextmanager
    def open_atomic(self, rel: str) -> Iterator[Any]:
        """A binary file that streams to ``rel`` and appears under that name only if the block exits cleanly.

        Locally a temporary file beside the target is synced and renamed; on an object store the
        upload (multipart when large) completes on exit and is aborted on an error. Not retried:
        the data is gone once written, so a caller that must retry holds it and uses write_bytes.
        """
        final = self.path(rel)
        if self.local:
            os.makedirs(posixpath.dirname(final), exist_ok=True)
            tmp = f"{final}.tmp-{uuid.uuid4().hex}"
            try:
                with open(tmp, "wb") as f:
                    yield f
                    f.flush()
                    os.fsync(f.fileno())
                    written = f.tell()
                os.replace(tmp, final)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        else:
            f = self.fs.open(final, "wb")
            try:
                yield f
                written = f.tell()
            except BaseException:
                f.discard()  # aborts a multipart upload; a small one was never sent
                f.closed = True  # discarded: closing (also on garbage collection) would send the rest
                raise
            f.close()  # an object store's PUT is atomic: the key shows only once the upload completed
            self.fs.invalidate_cache(final)
        size = self.fs.info(final)["size"]
        if size != written:
            raise OSError(f"{self.uri(rel)}: wrote {written} bytes but the store holds {size}")

    def write_json(self, rel: str, obj: Any) -> str:
        return self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True).encode())

    def put_file(self, local_path: str | Path, rel: str) -> str:
        return self.write_bytes(rel, Path(local_path).read_bytes())

    def put_dir(self, local_dir: str | Path, rel: str) -> str:
        """Upload every file of a local folder under ``rel``, each one atomically."""
        local_dir = Path(local_dir)
        for f in sorted(local_dir.rglob("*")):
            if f.is_file():
                self.put_file(f, posixpath.join(rel, f.relative_to(local_dir).as_posix()))
        return self.uri(rel)

    @retry
    def get_dir(self, rel: str, local_dir: str | Path) -> Path:
        """Copy the folder ``rel`` to ``local_dir`` (returned)."""
        local_dir = Path(local_dir)
        src = self.path(rel)
        self.fs.invalidate_cache(src)  # another process (an earlier stage, a resumed run) wrote it
        for f in self.fs.find(src):
            target = local_dir / posixpath.relpath(f, src)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.fs.cat_file(f))
        return local_dir

    @retry
    def ls(self, rel: str = "") -> list[str]:
        """Names directly under ``rel`` (empty when it does not exist)."""
        self.fs.invalidate_cache(self.path(rel) if rel else self.root)
        try:
            entries = self.fs.ls(self.path(rel) if rel else self.root, detail=False)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)

    def open(self, rel: str, mode: str = "rb"):
        if "w" in mode or "a" in mode:
            raise ValueError("use write_bytes/put_file: writes must be atomic")
        return self.fs.open(self.path(rel), mode)
