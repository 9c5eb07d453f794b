"""``csv``: image-text pairs listed in a CSV file (an image path column and a caption column).

The layout ``open_clip_train --dataset-type csv`` reads; relative image paths are resolved
against the CSV file's folder. Paths may be local or any fsspec URL (``s3://...``).
"""

from __future__ import annotations

import csv
import io
import posixpath
from collections.abc import Iterator

import fsspec
from pydantic import BaseModel, ConfigDict, Field

import clipforge
from clipforge.core.components import Sample


class CsvParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="the CSV file (local path or fsspec URL)")
    image_column: str = "filepath"
    caption_column: str = "title"
    separator: str = Field(",", min_length=1, max_length=1)


class CsvPairs:
    """One :class:`~clipforge.Sample` per row; an unreadable image file becomes a sample without image (curation drops it)."""

    def __init__(self, path: str, image_column: str = "filepath", caption_column: str = "title", separator: str = ","):
        self.path, self.image_column, self.caption_column, self.separator = path, image_column, caption_column, separator

    def __iter__(self) -> Iterator[Sample]:
        base = posixpath.dirname(self.path)
        with fsspec.open(self.path, "rt", newline="") as f:
            rows = csv.DictReader(f, delimiter=self.separator)
            missing = {self.image_column, self.caption_column} - set(rows.fieldnames or [])
            if missing:
                raise clipforge.ConfigError(f"{self.path}: no column {', '.join(sorted(missing))} (has {rows.fieldnames})")
            for i, row in enumerate(rows):
                image_path = row[self.image_column]
                if "://" not in image_path and not posixpath.isabs(image_path):
                    image_path = posixpath.join(base, image_path)
                try:
                    with fsspec.open(image_path, "rb") as img:
                        image = img.read()
                except OSError:
                    image = None
                yield Sample(key=f"row-{i:09d}", image=image, caption=row[self.caption_column], meta={"source": image_path})


def read_csv_pairs(path: str, image_column: str = "filepath", caption_column: str = "title", separator: str = ",") -> CsvPairs:
    """Image-text pairs from a CSV file (open_clip_train's csv layout)."""
    return CsvPairs(path, image_column, caption_column, separator)


@clipforge.hookimpl
def register_datasets(register):
    register("csv", read_csv_pairs, params=CsvParams)
