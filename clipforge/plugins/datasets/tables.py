"""``csv`` and ``parquet``: a table of image paths (local or on S3) and captions."""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

import clipforge
from clipforge.core.components import Sample


class TableParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="the table: a local path or a URL (s3://...)")
    image_column: str = "filepath"
    caption_column: str | None = Field(None, description="default: 'title' for csv (open_clip_train), 'caption' for parquet")
    key_column: str | None = Field(None, description="defaults to the row number")
    separator: str = Field(",", description="csv only")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for the table and images")


class Table:
    """Rows of (image path, caption); relative image paths are resolved against the table's folder."""

    def __init__(self, fmt: str, path: str, image_column: str = "filepath", caption_column: str | None = None,
                 key_column: str | None = None, separator: str = ",", storage_options: dict[str, Any] | None = None):  # fmt: skip
        import fsspec

        self.fmt, self.path, self.separator = fmt, path, separator
        caption_column = caption_column or ("title" if fmt == "csv" else "caption")
        self.image_column, self.caption_column, self.key_column = image_column, caption_column, key_column
        self.storage_options = dict(storage_options or {})
        self.fs, self._table_path = fsspec.core.url_to_fs(path, **self.storage_options)
        table = self._read()
        missing = [c for c in (image_column, caption_column, key_column) if c and c not in table.column_names]
        if missing:
            raise clipforge.ConfigError(
                f"{fmt} {path}: no column {', '.join(map(repr, missing))}; columns: {', '.join(table.column_names)}"
            )
        self.rows = table.select([c for c in (image_column, caption_column, key_column) if c]).to_pylist()

    def _read(self):
        import pyarrow.csv
        import pyarrow.parquet

        if not self.fs.exists(self._table_path):
            raise clipforge.ConfigError(f"{self.fmt}: table not found: {self.path}")
        with self.fs.open(self._table_path, "rb") as f:
            if self.fmt == "parquet":
                return pyarrow.parquet.read_table(f)
            options = pyarrow.csv.ParseOptions(delimiter=self.separator)
            convert = pyarrow.csv.ConvertOptions(strings_can_be_null=True)
            return pyarrow.csv.read_csv(f, parse_options=options, convert_options=convert)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[Sample]:
        folder = posixpath.dirname(self._table_path)
        for i, row in enumerate(self.rows):
            key = re.sub(r"[^A-Za-z0-9_\-]", "_", str(row[self.key_column])) if self.key_column else f"{i:09d}"
            location = row[self.image_column]
            meta: dict[str, Any] = {"image": location}
            image = None
            if not location:
                meta["error"] = "no image path"
            else:
                target = location if "://" in location or location.startswith("/") else posixpath.join(folder, location)
                try:
                    image = self.fs.cat_file(target.split("://", 1)[-1] if "://" in target else target)
                except FileNotFoundError:
                    meta["error"] = "image file not found"
                except OSError as e:
                    meta["error"] = f"image file unreadable ({type(e).__name__})"
            yield Sample(key=key, image=image, caption=row[self.caption_column], meta=meta)


def _csv(**kwargs) -> Table:
    """A CSV table of image paths and captions."""
    return Table("csv", **kwargs)


def _parquet(**kwargs) -> Table:
    """A Parquet table of image paths and captions."""
    kwargs.pop("separator", None)
    return Table("parquet", **kwargs)


@clipforge.hookimpl
def register_datasets(register):
    register("csv", _csv, params=TableParams)
    register("parquet", _parquet, params=TableParams)
