"""``clip-benchmark``: one task folder in CLIP_benchmark's webdataset layout, local or on S3.

What ``clip_benchmark.webdataset_builder.convert_dataset`` / ``convert_retrieval_dataset`` write,
and what the hub's ``wds_*`` sets hold::

    ROOT/dataset_type.txt                         retrieval | multilabel (absent: classification)
    ROOT/classnames.txt                           one class name a line (classification, multilabel)
    ROOT/zeroshot_classification_templates.txt    one prompt a line, {c} for the class (optional)
    ROOT/SPLIT/nshards.txt                        the number of shards
    ROOT/SPLIT/0.tar ... N-1.tar                  KEY.webp|png|jpg and KEY.cls | KEY.npy | KEY.txt

A ``cls`` member is the class index, an ``npy`` one a multi-hot vector over the classes (kept as
``meta["targets"]``, its caption the names of its classes), a ``txt`` one the captions, one a line. The shards stream through the store
with its retries. An image that does not decode is skipped and counted (``skipped``: key -> reason),
never silently: the evaluate stage reports the count with the set's metrics.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
from collections.abc import Iterator
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

import clipforge
from clipforge import Sample, Store, TarMember, check_template, read_tar

NAME = "clip-benchmark"
IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")
KINDS = ("classification", "multilabel", "retrieval")
TYPE_FILE, CLASSES_FILE, TEMPLATES_FILE, NSHARDS_FILE = (
    "dataset_type.txt",
    "classnames.txt",
    "zeroshot_classification_templates.txt",
    "nshards.txt",
)


class ClipBenchmarkParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    root: str = Field(min_length=1, description="the task folder: a local path or s3://bucket/prefix/TASK")
    split: str = Field("test", pattern=r"^[A-Za-z0-9_.-]+$", description="the split folder under root")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options (endpoint_url, ...)")
    classes: list[str] | None = Field(None, min_length=1, description="class names; default: the folder's classnames.txt")
    templates: list[Annotated[str, AfterValidator(check_template)]] | None = Field(
        None, min_length=1, description="zero-shot prompts with '{c}'; default: the folder's templates file"
    )


class ClipBenchmark:
    """A CLIP_benchmark webdataset folder: classification, multilabel or retrieval (``dataset_type``)."""

    def __init__(
        self,
        root: str,
        split: str = "test",
        storage_options: dict[str, Any] | None = None,
        classes: list[str] | None = None,
        templates: list[str] | None = None,
    ) -> None:
        self.root, self.split = root.rstrip("/"), split
        self.storage_options = dict(storage_options or {})
        self.store = Store(self.root, self.storage_options)
        self.dataset_type = read_dataset_type(self.store)
        self.multilabel = self.dataset_type == "multilabel"
        self.nshards = self._nshards()
        self.classes: list[str] | None = None
        self.templates: list[str] | None = None
        if self.dataset_type != "retrieval":
            self.classes = list(classes) if classes else self._lines(CLASSES_FILE, required=True)
            self.templates = list(templates) if templates else self._templates()
        #: After a pass: the samples left out, by key, with the reason (an image that does not decode).
        self.skipped: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"ClipBenchmark({self.store.url!r}, split={self.split!r}, {self.dataset_type})"

    def _file(self, rel: str) -> str:
        return self.store.uri(rel)

    def _nshards(self) -> int:
        rel = f"{self.split}/{NSHARDS_FILE}"
        if not self.store.exists(rel):
            raise clipforge.ConfigError(
                f"{NAME}: {self._file(rel)} is missing: not a CLIP_benchmark webdataset folder with split {self.split!r}"
            )
        text = self.store.read_bytes(rel).decode("utf-8", "replace").strip()
        if not text.isdigit() or int(text) < 1:
            raise clipforge.ConfigError(f"{NAME}: {self._file(rel)} must hold the number of shards, not {text[:40]!r}")
        return int(text)

    def _lines(self, rel: str, *, required: bool) -> list[str] | None:
        if not self.store.exists(rel):
            if required:
                raise clipforge.ConfigError(
                    f"{NAME}: {self._file(rel)} is missing: a {self.dataset_type} folder needs its classes"
                )
            return None
        lines = [line.strip() for line in self.store.read_bytes(rel).decode("utf-8").splitlines()]
        lines = [line for line in lines if line]
        if not lines:
            raise clipforge.ConfigError(f"{NAME}: {self._file(rel)} is empty")
        return lines

    def _templates(self) -> list[str] | None:
        lines = self._lines(TEMPLATES_FILE, required=False)
        for n, line in enumerate(lines or [], 1):
            try:
                check_template(line)
            except ValueError as e:
                raise clipforge.ConfigError(f"{NAME}: {self._file(TEMPLATES_FILE)} line {n}: {e}") from None
        return lines

    def content_digest(self) -> str:
        """sha256 of the folder's metadata files and its split's shards, byte for byte, with the classes and
        templates used (the recipe may override the folder's)."""
        digest = hashlib.sha256(json.dumps([self.dataset_type, self.classes, self.templates]).encode())
        for rel in (f"{self.split}/{NSHARDS_FILE}", *self.shards()):
            if not self.store.exists(rel):
                raise clipforge.ConfigError(f"{NAME}: {self._file(rel)} is missing; {self.nshards} shards were announced")
            digest.update(rel.encode())
            with self.store.open(rel) as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
        return digest.hexdigest()

    def shards(self) -> list[str]:
        return [f"{self.split}/{i}.tar" for i in range(self.nshards)]

    def __iter__(self) -> Iterator[Sample]:
        skipped: dict[str, str] = {}
        for rel in self.shards():
            if not self.store.exists(rel):
                raise clipforge.ConfigError(
                    f"{NAME}: {self._file(rel)} is missing; {self._file(f'{self.split}/{NSHARDS_FILE}')} says {self.nshards} shards"
                )
            with self.store.open(rel) as f:
                for key, members in _grouped(read_tar(f)):
                    sample = self._sample(rel, key, members, skipped)
                    if sample is not None:
                        yield sample
        self.skipped = skipped

    def _sample(self, shard: str, key: str, members: dict[str, bytes], skipped: dict[str, str]) -> Sample | None:
        from PIL import Image

        where = f"{self._file(shard)}: {key}"
        ext = next((e for e in IMAGE_EXTS if e in members), None)
        if ext is None:
            skipped[key] = f"no image (members: {', '.join(sorted(members)) or 'none'})"
            return None
        try:
            image = Image.open(io.BytesIO(members[ext]))
            image.load()
        except Exception as e:  # PIL raises several kinds on corrupt data
            skipped[key] = f"{ext} does not decode: {type(e).__name__}: {e}"[:200]
            return None
        meta: dict[str, Any] = {"shard": self._file(shard)}
        if self.dataset_type == "retrieval":
            if "txt" not in members:
                raise clipforge.ConfigError(f"{NAME}: {where} has no txt member (its captions)")
            captions = members["txt"].decode("utf-8").splitlines()
            return Sample(key, image.convert("RGB"), captions, meta=meta)
        assert self.classes is not None
        if self.multilabel:
            if "npy" not in members:
                raise clipforge.ConfigError(f"{NAME}: {where} has no npy member (its labels)")
            meta["targets"] = targets = _targets(members["npy"], len(self.classes), where)
            caption = ", ".join(c for c, t in zip(self.classes, targets, strict=True) if t) or "none of the classes"
            return Sample(key, image.convert("RGB"), caption, meta=meta)
        if "cls" not in members:
            raise clipforge.ConfigError(f"{NAME}: {where} has no cls member (its class index)")
        text = members["cls"].decode("utf-8", "replace").strip()
        if not text.lstrip("-").isdigit():
            raise clipforge.ConfigError(f"{NAME}: {where}.cls holds {text[:40]!r}, not a class index")
        label = int(text)
        if not 0 <= label < len(self.classes):
            raise clipforge.ConfigError(
                f"{NAME}: {where}.cls is class {label}, outside the {len(self.classes)} classes of {self._file(CLASSES_FILE)}"
            )
        return Sample(key, image.convert("RGB"), self.classes[label], label=label, meta=meta)


def read_dataset_type(store: Any) -> str:
    """The folder's ``dataset_type.txt`` (absent: classification), checked."""
    if not store.exists(TYPE_FILE):
        return "classification"
    kind = store.read_bytes(TYPE_FILE).decode("utf-8", "replace").strip().lower() or "classification"
    if kind not in KINDS:
        raise clipforge.ConfigError(f"{NAME}: {store.uri(TYPE_FILE)} says {kind[:40]!r}; expected one of {', '.join(KINDS)}")
    return kind


def _grouped(items: Iterator[Any]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The members of each key (webdataset's rule: the name before its first dot), in order."""
    key: str | None = None
    members: dict[str, bytes] = {}
    for item in items:
        if not isinstance(item, TarMember):
            raise clipforge.ConfigError(f"{NAME}: damaged shard: {item.describe()}")
        if item.kind != "file" or item.data is None:
            continue
        folder, base = posixpath.split(item.name.removeprefix("./"))
        stem, _, ext = base.partition(".")
        name = posixpath.join(folder, stem) if folder else stem
        if name != key:
            if key is not None:
                yield key, members
            key, members = name, {}
        members[ext.lower()] = item.data
    if key is not None:
        yield key, members


def _targets(data: bytes, n_classes: int, where: str) -> list[int]:
    import numpy as np

    try:
        vector = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:
        raise clipforge.ConfigError(f"{NAME}: {where}.npy is not a NumPy array: {e}") from None
    vector = np.asarray(vector).reshape(-1)
    if vector.shape[0] != n_classes:
        raise clipforge.ConfigError(f"{NAME}: {where}.npy has {vector.shape[0]} labels for {n_classes} classes")
    return [int(v) for v in vector]


@clipforge.hookimpl
def register_datasets(register):
    register(NAME, ClipBenchmark, params=ClipBenchmarkParams, description="a CLIP_benchmark webdataset folder (wds_*)")
