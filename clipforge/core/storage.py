"""The artifact store: a folder on the local disk or under any fsspec URL (``s3://``, ``gs://``,
``az://``, ...).

Every write is atomic (nothing half-written is ever visible under its final name) and checked
by size; transient errors are retried with exponential backoff on every filesystem, on top of
its client's own retries. Every read of a remote object goes by byte ranges, each one retried
when it fails or its body ends early (a dropped connection), so a read resumes from where it
stopped: s3fs reads a large object's ranges outside its own retries, and does not count a short
body as an error at all.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem

from clipforge.core.retry import IncompleteBody, retry
from clipforge.core.secrets import resolve_env_refs

#: botocore's "standard" retry mode retries 5xx answers, throttling (SlowDown) and connection errors
#: with jittered exponential backoff; the Store's own :func:`retry` wraps whole operations on top.
S3_RETRIES = {"max_attempts": 8, "mode": "standard"}

#: per protocol, the client-level retry setting that the store's options get unless they set it:
#: (option, key in it, value). gcsfs (gs, gcs) takes none: it retries 5xx, 408 and 429 answers and
#: dropped connections six times by itself. adlfs (az, abfs, abfss) passes none on to its Azure
#: client, whose default policy retries. Any other protocol has only the store's own retries.
CLIENT_RETRIES: dict[str, tuple[str, str, Any]] = {
    "s3": ("config_kwargs", "retries", S3_RETRIES),
    "s3a": ("config_kwargs", "retries", S3_RETRIES),
}

#: object stores, where an upload shows under its key only once complete and aborts cleanly
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})


def with_client_retries(protocol: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the protocol's client-level retry setting (:data:`CLIENT_RETRIES`), unless they set it."""
    if protocol not in CLIENT_RETRIES:
        return options
    option, key, value = CLIENT_RETRIES[protocol]
    nested = dict(options.get(option) or {})
    nested.setdefault(key, value)
    return {**options, option: nested}


#: bytes per ranged GET where the filesystem does not say (s3fs: its ``default_block_size``)
READ_BLOCK = 8 << 20


class _RangedReader(io.RawIOBase):
    """A remote object read by byte ranges, each fetched whole or retried (see the module's docstring)."""

    def __init__(self, fs: Any, path: str, size: int) -> None:
        self.fs, self.path, self.size, self.pos = fs, path, size, 0
        self.block = int(getattr(fs, "default_block_size", None) or READ_BLOCK)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def _range(self, start: int, end: int) -> bytes:
        return read_range(self.fs, self.path, start, end, self.size)

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self.size - self.pos)
        if n <= 0:
            return 0
        data = self._range(self.pos, self.pos + n)
        buffer[:n] = data
        self.pos += n
        return n

    def readall(self) -> bytes:
        """The rest of the object: its blocks fetched concurrently where the filesystem can, each retried alone."""
        starts = list(range(self.pos, self.size, self.block))
        ends = [min(start + self.block, self.size) for start in starts]
        if len(starts) > 1 and hasattr(self.fs, "cat_ranges"):
            parts = self.fs.cat_ranges([self.path] * len(starts), starts, ends, on_error="return")
        else:
            parts = [None] * len(starts)
        out = [p if isinstance(p, bytes) and len(p) == e - s else self._range(s, e) for p, s, e in zip(parts, starts, ends)]
        self.pos = self.size
        return b"".join(out)


@retry
def read_range(fs: Any, path: str, start: int, end: int, size: int | None = None) -> bytes:
    """Bytes ``start`` to ``end`` (exclusive) of a remote object, one ranged GET, retried whole when
    its body ends early; ``size``, the object's, when known."""
    data = fs.cat_file(path, start=start, end=end)
    if len(data) == end - start:
        return bytes(data)
    if size is not None and len(data) == size and end - start < size:  # a server that ignores Range answers the whole object
        return bytes(data[start:end])
    if len(data) < end - start:
        raise IncompleteBody(f"{path}: got {len(data)} of the {end - start} bytes at {start}")
    raise OSError(f"{path}: got {len(data)} bytes for the {end - start} at {start}")


def open_read(fs: Any, path: str) -> BinaryIO:
    """``path`` on ``fs`` opened for reading: a local file as it is, a remote object by retried ranges."""
    if isinstance(fs, LocalFileSystem):
        return fs.open(path, "rb")
    fs.invalidate_cache(path)  # a listing cached before another process rewrote the object has the old size
    size = retry(fs.info)(path).get("size")
    if size is None:  # a server that does not say: one whole read, retried whole
        return io.BytesIO(retry(fs.cat_file)(path))
    raw = _RangedReader(fs, path, int(size))
    return io.BufferedReader(raw, buffer_size=min(raw.block, READ_BLOCK))


def open_input(url: str, storage_options: dict[str, Any] | None = None) -> BinaryIO:
    """A file at any fsspec URL (a dataset's shard, table or image) opened as :func:`open_read` does."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return open_read(fs, path)


def read_all(fs: Any, path: str) -> bytes:
    """The whole of ``path`` on ``fs``, remote objects by retried ranges."""
    if isinstance(fs, LocalFileSystem):
        return fs.cat_file(path)
    with open_read(fs, path) as f:
        return f.read()


class Store:
    """Relative paths under ``root`` on any fsspec filesystem."""

    def __init__(self, root: str, options: dict[str, Any] | None = None):
        # the recipe's options, ${ENV_VAR} references unresolved: what sub() passes on
        self.options = dict(options or {})
        resolved = with_client_retries(fsspec.core.split_protocol(root)[0] or "file", resolve_env_refs(self.options))
        self.fs, path = fsspec.core.url_to_fs(root, **resolved)
        self.local = isinstance(self.fs, LocalFileSystem)
        protocols = {self.fs.protocol} if isinstance(self.fs.protocol, str) else set(self.fs.protocol)
        self.object_store = bool(protocols & OBJECT_STORES)
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
        """A URI another process can open (a local path, or a URL such as ``s3://...``)."""
        return self.path(*parts) if self.local else self.fs.unstrip_protocol(self.path(*parts))

    def sub(self, *parts: str) -> Store:
        return Store(self.uri(*parts), self.options)

    @retry
    def exists(self, rel: str) -> bool:
        self.fs.invalidate_cache(self.path(rel))  # s3fs answers from cached listings otherwise
        return self.fs.exists(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        return read_all(self.fs, self.path(rel))

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        """Bytes ``start`` to ``end`` (exclusive) of ``rel``, in one ranged read (retried on a remote store)."""
        if not self.local:
            return read_range(self.fs, self.path(rel), start, end)
        with open(self.path(rel), "rb") as f:
            f.seek(start)
            data = f.read(end - start)
        if len(data) != end - start:
            raise OSError(f"{self.uri(rel)}: {len(data)} of {end - start} bytes at {start}: the file is shorter")
        return data

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
        upload (multipart when large) completes on exit and is aborted on an error; on any other
        filesystem (where a file shows while written) a temporary file beside the target is
        renamed. Not retried: the data is gone once written, so a caller that must retry holds it
        and uses write_bytes.
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
        elif self.object_store:
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
        else:
            self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
            tmp = f"{final}.tmp-{uuid.uuid4().hex}"
            try:
                with self.fs.open(tmp, "wb") as f:
                    yield f
                    written = f.tell()
                self.fs.mv(tmp, final)
            finally:
                if self.fs.exists(tmp):
                    self.fs.rm(tmp)
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

    def get_dir(self, rel: str, local_dir: str | Path) -> Path:
        """Copy the folder ``rel`` to ``local_dir`` (returned)."""
        local_dir = Path(local_dir)
        src = self.path(rel)
        self.fs.invalidate_cache(src)  # another process (an earlier stage, a resumed run) wrote it
        for f in retry(self.fs.find)(src):
            target = local_dir / posixpath.relpath(f, src)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(read_all(self.fs, f))
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

    def open(self, rel: str, mode: str = "rb") -> BinaryIO:
        """``rel`` for reading (seekable; a remote object by retried ranges, see :func:`open_read`)."""
        if mode != "rb":
            raise ValueError("the store opens files for reading, in binary ('rb'); writes must be atomic: use write_bytes")
        return open_read(self.fs, self.path(rel))
