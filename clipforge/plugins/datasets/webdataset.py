"""``webdataset``: tar shards in img2dataset's layout (``KEY.jpg|png|webp``, ``KEY.txt``, ``KEY.json``), local or on S3."""

from __future__ import annotations

import json
import posixpath
import tarfile
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

import clipforge
from clipforge.core.components import Sample

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class WebDatasetParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    urls: str | list[str] = Field(
        description="shard paths or URLs: a list, a glob (shards/*.tar) or a brace pattern (shard-{000000..000099}.tar)"
    )
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options (endpoint_url, ...)")


def expand_urls(urls: str | list[str], storage_options: dict[str, Any]) -> list[str]:
    """Every shard the entry names, brace patterns and globs expanded, in order."""
    import braceexpand
    import fsspec

    out: list[str] = []
    for url in [urls] if isinstance(urls, str) else urls:
        for item in braceexpand.braceexpand(url):
            if any(c in item for c in "*?["):
                fs, _, paths = fsspec.get_fs_token_paths(item, storage_options=storage_options)
                out += sorted(fs.unstrip_protocol(p) if "://" in item else p for p in paths)
            else:
                out.append(item)
    return out


class WebDataset:
    """Samples of webdataset tar shards; a truncated or unreadable shard yields one sample carrying the error."""

    def __init__(self, urls: str | list[str], storage_options: dict[str, Any] | None = None):
        self.storage_options = dict(storage_options or {})
        self.urls = expand_urls(urls, self.storage_options)
        if not self.urls:
            raise clipforge.ConfigError(f"webdataset: no shard matches {urls!r}")

    def __iter__(self) -> Iterator[Sample]:
        for url in self.urls:
            yield from self._shard(url)

    def parts(self) -> list[dict[str, Any]]:
        """One dataset entry per shard, for curation to process in parallel."""
        return [{"type": "webdataset", "urls": url, "storage_options": self.storage_options} for url in self.urls]

    def _shard(self, url: str) -> Iterator[Sample]:
        import fsspec

        group: dict[str, Any] = {}
        try:
            with fsspec.open(url, "rb", **self.storage_options) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    name = member.name
                    key, ext = _split(name)
                    if group and group["key"] != key:
                        yield _sample(group, url)
                        group = {}
                    group["key"] = key
                    data = tar.extractfile(member)
                    group[ext] = data.read() if data is not None else b""
        except (tarfile.TarError, EOFError, OSError) as e:
            # the samples before the damage were yielded whole; the one being read when it hit is lost, with its reason
            key = group.get("key") or f"{posixpath.basename(url)}#unreadable"
            error = f"truncated or unreadable shard ({type(e).__name__})"
            yield Sample(key=key, image=None, caption=None, meta={"shard": url, "error": error})
            return
        if group:
            yield _sample(group, url)


def _split(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is everything before the first dot of the file name."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(folder, stem) if folder else stem), ext.lower()


def _sample(group: dict[str, Any], url: str) -> Sample:
    image = next((group[e] for e in IMAGE_EXTS if e in group), None)
    meta: dict[str, Any] = {"shard": url}
    if "json" in group:
        try:
            meta.update(json.loads(group["json"]))
        except (ValueError, UnicodeDecodeError):
            meta["json_error"] = "invalid JSON"
    if image is None:
        meta["error"] = "no image"
    # captions stay bytes here: curation decodes them and drops non-UTF-8 with its reason
    return Sample(key=group["key"], image=image, caption=group.get("txt"), meta=meta)


@clipforge.hookimpl
def register_datasets(register):
    register("webdataset", WebDataset, params=WebDatasetParams)
