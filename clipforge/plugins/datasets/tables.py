"""``csv`` and ``parquet``: a table of images (paths, URLs, or Hugging Face ``{bytes, path}``) and captions.

Every row is one sample, however malformed: a row that cannot be used carries an ``error`` (the
reason curation records) and every sample its ``source`` (the table and row, counted from 0 after
the header) in ``meta``. Keys that only differ in characters a key may not hold stay distinct.
"""

from __future__ import annotations

import hashlib
import math
import posixpath
import re
from collections.abc import Iterator
from typing import Any, ClassVar

import fsspec
from pydantic import BaseModel, ConfigDict, Field

import clipforge
from clipforge import Sample, read_all

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")
MAX_KEY = 200  # what curation accepts


class TableParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="the table: a local path or a URL (s3://...)")
    image_column: str = Field(
        "filepath",
        description="image paths (relative to the table's folder), URLs (https://, s3://, ...), "
        "or images as {bytes, path} (Hugging Face) or bytes (parquet)",
    )
    caption_column: str | None = Field(None, description="default: 'title' for csv (open_clip_train), 'caption' for parquet")
    key_column: str | None = Field(None, description="defaults to the row number")
    separator: str = Field(",", description="csv only")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for the table, and for images under the same protocol"
    )

    #: which table the entry reads: the format of its header check
    table_format: ClassVar[str] = "csv"

    def check_inputs(self) -> list[tuple[str, str]]:
        """The table exists and has the columns this entry reads (its header or schema only, not its rows)."""
        import pyarrow as pa
        import pyarrow.csv
        import pyarrow.parquet

        fmt = self.table_format
        try:
            fs, path = fsspec.core.url_to_fs(self.path, **self.storage_options)
            if not fs.exists(path):
                return [("path", f"{fmt}: table not found: {self.path}")]
            with fs.open(path, "rb") as f:
                if fmt == "parquet":
                    names = pyarrow.parquet.ParquetFile(f).schema_arrow.names
                else:
                    opts = pyarrow.csv.ParseOptions(delimiter=self.separator)
                    names = pyarrow.csv.open_csv(f, parse_options=opts).schema.names
        except (pa.ArrowException, OSError, ValueError) as e:
            return [("path", f"{fmt} {self.path}: not a readable table ({e})")]
        caption = self.caption_column or ("title" if fmt == "csv" else "caption")
        fields = {"image_column": self.image_column, "caption_column": caption, "key_column": self.key_column}
        return [
            (field, f"{fmt} {self.path}: no column {column!r} (set {field}); columns: {', '.join(names)}")
            for field, column in fields.items()
            if column and column not in names
        ]


class ParquetParams(TableParams):
    table_format: ClassVar[str] = "parquet"


class Table:
    """Rows of (image, caption); relative image paths are resolved against the table's folder."""

    def __init__(self, fmt: str, path: str, image_column: str = "filepath", caption_column: str | None = None,
                 key_column: str | None = None, separator: str = ",", storage_options: dict[str, Any] | None = None):  # fmt: skip
        self.fmt, self.path, self.separator = fmt, path, separator
        caption_column = caption_column or ("title" if fmt == "csv" else "caption")
        self.image_column, self.caption_column, self.key_column = image_column, caption_column, key_column
        self.storage_options = dict(storage_options or {})
        self.fs, self._table_path = fsspec.core.url_to_fs(path, **self.storage_options)
        self.protocol = path.split("://", 1)[0] if _URL.match(path) else "file"
        self.columns = [c for c in (image_column, caption_column, key_column) if c]
        #: each data row (as read, or None where the row was malformed) and what was wrong with it
        self.rows: list[dict[str, Any] | None] = []
        self.malformed: dict[int, str] = {}
        self.bad_keys: dict[int, str] = {}
        self._read()
        self.keys = _unique_keys([self._raw_key(i, row) for i, row in enumerate(self.rows)])

    def _read(self) -> None:
        import pyarrow as pa
        import pyarrow.csv
        import pyarrow.parquet

        if not self.fs.exists(self._table_path):
            raise clipforge.ConfigError(f"{self.fmt}: table not found: {self.path}")
        bad: list[Any] = []

        def skip(row: Any) -> str:
            bad.append(row)
            return "skip"

        try:
            with self.fs.open(self._table_path, "rb") as f:
                if self.fmt == "parquet":
                    names = pyarrow.parquet.ParquetFile(f).schema_arrow.names
                    self._check_columns(names)
                    f.seek(0)
                    table = pyarrow.parquet.read_table(f, columns=self.columns)
                else:
                    # the columns read as bytes: numbers stay text ("007"), and text that is no UTF-8 stops no one
                    table = pyarrow.csv.read_csv(
                        f,
                        read_options=pyarrow.csv.ReadOptions(use_threads=False),  # malformed rows numbered
                        parse_options=pyarrow.csv.ParseOptions(delimiter=self.separator, invalid_row_handler=skip),
                        convert_options=pyarrow.csv.ConvertOptions(
                            column_types=dict.fromkeys(self.columns, pa.binary()), strings_can_be_null=True
                        ),
                    )
                    self._check_columns(table.column_names)
        except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
            raise clipforge.ConfigError(f"{self.fmt} {self.path}: not a readable table ({e})") from None
        rows = table.select(self.columns).to_pylist()
        # header = record 1: data row i is record i + 2
        malformed = {row.number - 2: f"expected {row.expected_columns} columns, got {row.actual_columns}" for row in bad}
        good = iter(rows)
        for i in range(len(rows) + len(malformed)):
            self.rows.append(None if i in malformed else next(good))
        self.malformed = malformed

    def _check_columns(self, names: list[str]) -> None:
        missing = [c for c in self.columns if c not in names]
        if missing:
            raise clipforge.ConfigError(
                f"{self.fmt} {self.path}: no column {', '.join(map(repr, missing))}; columns: {', '.join(names)}"
            )

    def __len__(self) -> int:
        return len(self.rows)

    def _raw_key(self, i: int, row: dict[str, Any] | None) -> str | None:
        if not self.key_column:
            return f"{i:09d}"
        if row is None:
            return None
        value = row[self.key_column]
        if isinstance(value, bytes):  # a key need not be UTF-8 to tell rows apart
            value = value.decode("utf-8", "replace")
        try:
            return _text(value, "key")
        except _Bad as e:
            self.bad_keys[i] = str(e)
            return None

    def __iter__(self) -> Iterator[Sample]:
        for i, (row, (key, raw)) in enumerate(zip(self.rows, self.keys)):
            source = f"{self.path} row {i}" + (f" (key {raw!r})" if raw is not None and raw != key else "")
            meta: dict[str, Any] = {"source": source}
            if row is None:
                yield Sample(key=key, image=None, caption=None, meta={**meta, "error": f"malformed row ({self.malformed[i]})"})
                continue
            if raw is None:
                yield Sample(key=key, image=None, caption=None, meta={**meta, "error": self.bad_keys.get(i, "missing key")})
                continue
            image = caption = None
            try:
                caption = _caption(row[self.caption_column])
                image = self._image(row[self.image_column], meta)
            except _Bad as e:
                meta["error"] = str(e)
            except Exception as e:  # one malformed row never stops the table
                meta["error"] = f"malformed row ({type(e).__name__}: {e})"[:300]
            yield Sample(key=key, image=image, caption=caption, meta=meta)

    def _image(self, value: Any, meta: dict[str, Any]) -> bytes:
        """The image bytes a cell gives; where they came from goes to ``meta["image"]``."""
        if isinstance(value, dict):  # Hugging Face's Image feature: {bytes, path}
            if value.get("path"):
                meta["image"] = str(value["path"])
            if value.get("bytes"):
                return bytes(value["bytes"])
            value = value.get("path")
        if isinstance(value, bytes) and self.fmt == "parquet":
            if not value:
                raise _Bad("empty image file")
            return value
        location = _text(value, "image path")
        if not location:
            raise _Bad("no image path")
        meta["image"] = location
        if _URL.match(location):
            protocol = location.split("://", 1)[0]
            options = self.storage_options if protocol == self.protocol else {}
            try:
                fs, target = fsspec.core.url_to_fs(location, **options)
            except (ValueError, ImportError) as e:  # a protocol fsspec does not know, or whose package is missing
                raise _Bad(f"image URL not readable here ({e})"[:300]) from None
        else:
            fs = self.fs
            target = location if location.startswith("/") else posixpath.join(posixpath.dirname(self._table_path), location)
        try:
            return read_all(fs, target)
        except FileNotFoundError:
            raise _Bad("image file not found") from None
        except Exception as e:  # a network or store error that outlasted the retries
            raise _Bad(f"image file unreadable ({type(e).__name__})") from None


class _Bad(Exception):
    """A row that cannot become a sample; the message is the reason."""


def _text(value: Any, what: str = "value") -> str | None:
    """A cell as text: bytes decoded, numbers written out (integral floats without ``.0``), NaN as nothing."""
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad(f"{what} is not UTF-8") from None
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return str(int(value)) if value.is_integer() else str(value)
    if isinstance(value, (str, int)):
        return str(value)
    raise _Bad(f"{what} is not text ({type(value).__name__})")


def _caption(value: Any) -> str | bytes | list[Any] | None:
    """Captions as curation takes them: text, numbers written as text; bytes that are not UTF-8 stay
    bytes, for curation to drop with its reason."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        return [_caption(v) for v in value]
    return _text(value, "caption")


def _unique_keys(raws: list[str | None]) -> list[tuple[str, str | None]]:
    """Each row's key and the raw value it came from (None: the row has none).

    A raw key is made safe: characters other than letters, digits, ``_`` and ``-`` become ``_``
    (long ones are cut and hashed). Distinct raw keys that become one are told apart: the one that
    was already safe (else the first) keeps the key, each other gets its first row's number. Equal
    raw keys stay equal: curation drops the later ones as duplicates.
    """
    first_row: dict[str, int] = {}
    for i, raw in enumerate(raws):
        if raw:
            first_row.setdefault(raw, i)
    groups: dict[str, list[str]] = {}  # safe key -> the distinct raw keys that become it, in row order
    for raw in first_row:
        groups.setdefault(_safe(raw), []).append(raw)
    assigned = {(key if key in group else group[0]): key for key, group in groups.items()}
    used = set(assigned.values())

    def fresh(key: str, suffix: str) -> str:
        new = key[: MAX_KEY - len(suffix)] + suffix
        while new in used:
            new += "-"
        used.add(new)
        return new

    for key, group in groups.items():
        for raw in group:
            if raw not in assigned:
                assigned[raw] = fresh(key, f"-row{first_row[raw]}")
    return [(assigned[raw], raw) if raw else (fresh("", f"row-{i:09d}"), None) for i, raw in enumerate(raws)]


def _safe(raw: str) -> str:
    key = _UNSAFE.sub("_", raw)
    if len(key) > MAX_KEY - 16:  # room for a row number
        key = f"{key[: MAX_KEY - 29]}-{hashlib.sha1(raw.encode()).hexdigest()[:12]}"
    return key


def _csv(**kwargs) -> Table:
    """A CSV table of images and captions."""
    return Table("csv", **kwargs)


def _parquet(**kwargs) -> Table:
    """A Parquet table of images and captions."""
    kwargs.pop("separator", None)
    return Table("parquet", **kwargs)


@clipforge.hookimpl
def register_datasets(register):
    register("csv", _csv, params=TableParams)
    register("parquet", _parquet, params=ParquetParams)
