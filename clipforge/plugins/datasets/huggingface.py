"""``huggingface``: a split of a Hugging Face dataset, read through the ``datasets`` library.

``path`` is what :func:`datasets.load_dataset` takes (a local folder of parquet, arrow or
imagefolder data, a dataset on the hub or in its cache: ``ORG/NAME``, a packaged builder with
``data_files``), a single data file (``.parquet``, ``.arrow``, ``.csv``, ``.json``/``.jsonl``), or a
folder written by ``save_to_disk``. Offline (``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``) the hub
is read from the machine's caches only, as ``datasets`` itself does.

Every row is one sample, however malformed: images are read undecoded (an ``Image`` feature as
``{bytes, path}``, or a bytes column), so a broken one is dropped by curation with its reason
instead of stopping the split; a row without an image or caption carries an ``error``; every sample
names its row in ``meta["source"]``. Keys are the key column's values made store-safe, else
``SPLIT-ROW`` with the row's index in the split, the same for any number of parts and in both modes.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
from pydantic import BaseModel, ConfigDict, Field

import clipforge
from clipforge import Sample, read_all

#: rows per part when a dataset that is not streamed is split for parallel curation
ROWS_PER_PART = 10_000
#: shards a ``save_to_disk`` folder is streamed in (rows split evenly)
SAVED_SHARDS = 64
MAX_KEY = 200  # what curation accepts
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")
_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json"}


class HuggingFaceParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(
        description="what datasets.load_dataset takes (a local folder, ORG/NAME on the hub or in its cache, a builder "
        "name), a data file (.parquet, .arrow, .csv, .json, .jsonl), or a save_to_disk folder"
    )
    split: str = Field("train", description="the split (slices as datasets writes them: train[:1000])")
    image_column: str = Field(
        "image", description="an Image feature, image bytes, or image paths (relative to the data file's folder) or URLs"
    )
    caption_column: str = Field("text", description="a caption per row: text or a list of texts")
    streaming: bool = Field(True, description="read the data as it comes instead of preparing it in the datasets cache")
    name: str | None = Field(None, description="the dataset's configuration")
    revision: str | None = Field(None, description="a hub dataset's branch, tag or commit")
    data_files: str | list[str] | dict[str, str | list[str]] | None = Field(None, description="as load_dataset takes")
    key_column: str | None = Field(None, description="a unique key per row; default: SPLIT-ROW (the row's index)")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for remote data")
    parts: int | None = Field(
        None,
        gt=0,
        description="parts curated in parallel; default: one per shard when streaming (at most that many), "
        f"one per {ROWS_PER_PART:,} rows otherwise",
    )
    part: tuple[int, int] | None = Field(
        None, description="set by curation: read only part INDEX of COUNT (contiguous shards or rows)"
    )
    first_row: int | None = Field(None, ge=0, description="set by curation: the split's index of the part's first row")

    def check_inputs(self) -> list[tuple[str, str]]:
        """The split opens and has the columns this entry reads (its features, or its first row)."""
        try:
            ds = open_split(self)
            _check_columns(self, column_names(ds))
        except clipforge.ConfigError as e:
            return [(getattr(e, "field", "path"), str(e))]
        return []


class _InputError(clipforge.ConfigError):
    """A problem with the entry's inputs, and the entry's field it concerns."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _describe(p: HuggingFaceParams) -> str:
    return f"huggingface {p.path}" + (f" ({p.name})" if p.name else "") + f" [{p.split}]"


def open_split(p: HuggingFaceParams) -> Any:
    """The entry's split as a ``datasets`` Dataset (or IterableDataset when streaming), images undecoded."""
    import datasets

    try:
        ds = _load(datasets, p)
    except _InputError:
        raise
    except ValueError as e:
        field = "split" if "split" in str(e).lower() else "path"
        raise _InputError(field, f"{_describe(p)}: {e}") from None
    except Exception as e:  # not found, offline without a cached copy, a file datasets cannot read
        raise _InputError("path", f"{_describe(p)}: cannot open ({type(e).__name__}: {e})"[:600]) from None
    features = ds.features or {}
    for column, feature in features.items():
        if isinstance(feature, datasets.Image) and feature.decode:  # decoded by curation, where a bad one is counted
            ds = ds.cast_column(column, datasets.Image(decode=False))
    return ds


def _load(datasets: Any, p: HuggingFaceParams) -> Any:
    local = None if "://" in p.path else Path(p.path).expanduser()
    options = p.storage_options or None
    if local is not None and any((local / f).is_file() for f in ("state.json", "dataset_dict.json")):  # save_to_disk
        saved = datasets.load_from_disk(str(local))
        if isinstance(saved, datasets.DatasetDict):
            if p.split not in saved:
                raise _InputError("split", f"{_describe(p)}: no split {p.split!r}; splits: {', '.join(saved)}")
            saved = saved[p.split]
        return saved.to_iterable_dataset(num_shards=max(1, min(len(saved), SAVED_SHARDS))) if p.streaming else saved
    kwargs: dict[str, Any] = {"split": p.split, "streaming": p.streaming, "revision": p.revision, "storage_options": options}
    if local is not None and local.is_file():  # one data file: its format's builder
        builder = _BUILDERS.get("".join(local.suffixes[-1:]).lower())
        if builder is None:
            raise _InputError("path", f"{_describe(p)}: a data file must end in {', '.join(_BUILDERS)}")
        return datasets.load_dataset(builder, data_files={_split_name(p.split): str(local)}, **kwargs)
    if local is not None and p.path.startswith((".", "/", "~")) and not local.exists():
        raise _InputError("path", f"{_describe(p)}: no such file or folder")
    return datasets.load_dataset(p.path, p.name, data_files=p.data_files, **kwargs)


def _split_name(split: str) -> str:
    """``train`` of ``train[:10%]``."""
    return split.split("[", 1)[0].split("+", 1)[0].strip() or "train"


def column_names(ds: Any) -> list[str]:
    """The split's columns: from its features, else (a streamed JSON or CSV file) from its first row."""
    if ds.column_names is not None:
        return list(ds.column_names)
    return list(next(iter(ds), {}))


def _check_columns(p: HuggingFaceParams, names: list[str]) -> None:
    wanted = {"image_column": p.image_column, "caption_column": p.caption_column, "key_column": p.key_column}
    missing = [(field, column) for field, column in wanted.items() if column and column not in names]
    if missing:
        field = missing[0][0]
        what = "; ".join(f"no column {column!r} (set {f})" for f, column in missing)
        raise _InputError(field, f"{_describe(p)}: {what}; columns: {', '.join(names) or 'none'}")


def _contiguous(total: int, count: int, index: int) -> tuple[int, int]:
    """Rows (or shards) ``[start, stop)`` of part ``index`` of ``count``, as ``datasets``' ``shard`` splits them."""
    div, mod = divmod(total, count)
    start = div * index + min(index, mod)
    return start, start + div + (1 if index < mod else 0)


class HuggingFaceDataset:
    """One split of a Hugging Face dataset (or one part of it), as samples (see the module's docstring)."""

    def __init__(self, **fields: Any) -> None:
        self.params = p = HuggingFaceParams(**fields)
        self.ds = open_split(p)
        self.columns = column_names(self.ds)
        _check_columns(p, self.columns)
        self.prefix = _safe(p.split)
        self.protocol = p.path.split("://", 1)[0] if "://" in p.path else "file"
        self.base = _base_folder(p.path)

    def _shards(self, count: int) -> Any:
        """The streamed split, resharded where that gives ``count`` parts (parquet row groups)."""
        ds = self.ds
        if count > ds.num_shards:
            ds = ds.reshard()
        return ds

    def _selected(self) -> tuple[Any, int]:
        """The rows this entry reads, and the split's index of the first."""
        p, ds = self.params, self.ds
        if p.part is None:
            return ds, 0
        index, count = p.part
        if p.streaming:
            return self._shards(count).shard(num_shards=count, index=index, contiguous=True), p.first_row or 0
        start, stop = _contiguous(len(ds), count, index)
        return ds.select(range(start, stop)), start

    def parts(self) -> list[dict[str, Any]]:
        """Contiguous parts: shards of the streamed split (counted where keys need row indices), else row ranges."""
        p = self.params
        if p.part is not None:
            return [p.model_dump() | {"type": "huggingface"}]
        if p.streaming:
            count = min(p.parts or self.ds.num_shards, self._shards(p.parts or 1).num_shards)
        else:
            count = min(p.parts or math.ceil(len(self.ds) / ROWS_PER_PART), len(self.ds))
        count = max(count, 1)
        firsts = [0] * count
        if p.streaming and count > 1 and not p.key_column:  # the row index of each part's first row
            ds = self._shards(count).select_columns([p.caption_column])
            sizes = [sum(len(b[p.caption_column]) for b in ds.shard(count, i).iter(batch_size=1024)) for i in range(count)]
            firsts = [sum(sizes[:i]) for i in range(count)]
        entry = p.model_dump(exclude={"parts", "part", "first_row"})
        return [{"type": "huggingface", **entry, "part": [i, count], "first_row": firsts[i]} for i in range(count)]

    def __iter__(self) -> Iterator[Sample]:
        p = self.params
        ds, first = self._selected()
        ds = ds.select_columns([c for c in dict.fromkeys((p.image_column, p.caption_column, p.key_column)) if c])
        row = first
        rows = iter(ds)
        while True:
            try:
                values = next(rows)
            except StopIteration:
                return
            except Exception as e:  # a file that breaks off: what follows it in this part cannot be read
                yield Sample(key=f"{self.prefix}-{row:09d}-unreadable", image=None, caption=None, meta={
                    "source": f"{_describe(p)} from row {row}",
                    "error": f"unreadable from here on ({type(e).__name__}: {e})"[:300],
                })  # fmt: skip
                return
            yield self._sample(row, values)
            row += 1

    def _sample(self, row: int, values: dict[str, Any]) -> Sample:
        p = self.params
        meta: dict[str, Any] = {"source": f"{_describe(p)} row {row}"}
        key = f"{self.prefix}-{row:09d}"
        if p.key_column:
            raw = values[p.key_column]
            raw = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
            if raw is None or raw == "" or not isinstance(raw, (str, int)):
                meta["error"] = "missing key" if raw in (None, "") else f"key is not text ({type(raw).__name__})"
                return Sample(key=f"{key}-nokey", image=None, caption=None, meta=meta)
            key = _safe(str(raw))
            if key != str(raw):
                meta["source"] += f" (key {raw!r})"
        caption = values[p.caption_column]
        if not (caption is None or isinstance(caption, (str, bytes, list))):
            meta["error"] = f"caption is not text ({type(caption).__name__})"
            return Sample(key=key, image=None, caption=None, meta=meta)
        try:
            image = self._image(values[p.image_column], meta)
        except _Bad as e:
            meta["error"] = str(e)
            image = None
        return Sample(key=key, image=image, caption=caption, meta=meta)

    def _image(self, value: Any, meta: dict[str, Any]) -> Any:
        """The image bytes (or PIL image) a cell gives; a path it names goes to ``meta["image"]``."""
        if isinstance(value, dict):  # an undecoded Image feature: {bytes, path}
            if value.get("path"):
                meta["image"] = str(value["path"])
            data, path = value.get("bytes"), value.get("path")
            value = path if path and not data else data
        if isinstance(value, (bytes, bytearray)):
            if not value:
                raise _Bad("empty image file")
            return bytes(value)
        if value is None or value == "":
            raise _Bad("no image")
        if not isinstance(value, str):
            if hasattr(value, "mode") and hasattr(value, "size"):  # a PIL image (a nested feature datasets decoded)
                return value
            raise _Bad(f"image is neither bytes nor a path ({type(value).__name__})")
        meta["image"] = value
        if self.base and "://" not in value and not value.startswith(("/", "~")):  # as the tables: relative to the data
            value = f"{self.base}/{value}"
        protocol = value.split("://", 1)[0] if "://" in value else "file"
        options = self.params.storage_options if protocol == self.protocol else {}
        try:
            fs, target = fsspec.core.url_to_fs(value, **options)
            return read_all(fs, target)
        except FileNotFoundError:
            raise _Bad("image file not found") from None
        except Exception as e:  # an unknown protocol, a store error that outlasted the retries
            raise _Bad(f"image file unreadable ({type(e).__name__})") from None


def _base_folder(path: str) -> str | None:
    """The folder relative image paths are read from: a data file's, a local dataset folder; none for the hub."""
    if path.lower().endswith(tuple(_BUILDERS)):
        return path.rsplit("/", 1)[0] if "/" in path else "."
    local = Path(path).expanduser()
    return str(local) if "://" not in path and local.is_dir() else None


class _Bad(Exception):
    """A row that cannot become a sample; the message is the reason."""


def _safe(raw: str) -> str:
    """A store-safe key for ``raw``: unchanged when it is one; else its unsafe characters as ``_`` and a
    hash of ``raw``, so that keys differing only in such characters stay apart in any part."""
    key = _UNSAFE.sub("_", raw)
    if key == raw and 0 < len(key) <= MAX_KEY:
        return key
    return f"{key[: MAX_KEY - 17]}-{hashlib.sha1(raw.encode()).hexdigest()[:16]}"


@clipforge.hookimpl
def register_datasets(register):
    register("huggingface", HuggingFaceDataset, params=HuggingFaceParams)
