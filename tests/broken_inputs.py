"""A corpus of broken inputs, generated: img2dataset-style shards damaged every way a crawl damages
them, tables, recipes and command lines. Each case says what curation, validation or the command
line must make of it; tests/test_broken_inputs.py feeds them through and checks.

Add a case by adding a builder to ``SHARD_KINDS`` (or a row to the other lists): every builder
runs in every tar format and at every position of the damaged sample in its shard.
"""

from __future__ import annotations

import io
import json
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image

FORMATS = {"gnu": tarfile.GNU_FORMAT, "ustar": tarfile.USTAR_FORMAT, "pax": tarfile.PAX_FORMAT}
KEPT = None  # an expectation: the sample is curated


def jpeg(seed: int, size: tuple[int, int] = (40, 24), orientation: int | None = None) -> bytes:
    """A small JPEG, its colour from ``seed``; with ``orientation`` an EXIF orientation tag."""
    crc = zlib.crc32(str(seed).encode())
    image = Image.new("RGB", size, (crc & 255, (crc >> 8) & 255, (crc >> 16) & 255))
    image.paste((255, 255, 255), (0, 0, size[0] // 2, size[1] // 3))  # a corner that shows the way up
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    image.save(buf, format="JPEG", quality=90, exif=exif.tobytes())
    return buf.getvalue()


@dataclass
class Entry:
    """A member to write: a regular file, or a link (``target`` set)."""

    name: str
    data: bytes = b""
    target: str | None = None
    kind: bytes = tarfile.REGTYPE


@dataclass
class Built:
    data: bytes
    starts: list[int]  # the offset where each entry begins (its first header)
    headers: list[int]  # the offset of each entry's own header (after any extended headers)
    ends: list[int]  # the offset just past each entry's data


def build(entries: list[Entry], fmt: int) -> Built:
    buf = io.BytesIO()
    starts, headers, ends = [], [], []
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for e in entries:
            starts.append(buf.tell())
            info = tarfile.TarInfo(e.name)
            if e.target is not None:
                info.type, info.linkname = e.kind, e.target
                tar.addfile(info)
            else:
                info.type, info.size = e.kind, len(e.data)
                tar.addfile(info, io.BytesIO(e.data) if e.kind == tarfile.REGTYPE else None)
            end = buf.tell()
            size = len(e.data) if e.target is None and e.kind == tarfile.REGTYPE else 0
            headers.append(end - size - (-size % 512) - 512)
            ends.append(end)
    return Built(buf.getvalue(), starts, headers, ends)


def sample_entries(key: str, seed: int, caption: str | bytes | None = None, meta: object = "default") -> list[Entry]:
    """img2dataset's members of one sample: ``KEY.jpg``, ``KEY.txt``, ``KEY.json``."""
    text = caption if caption is not None else f"a photo of thing {seed} on a table"
    sidecar = {"key": key, "url": f"https://example.com/{seed}.jpg", "status": "success"} if meta == "default" else meta
    return [
        Entry(f"{key}.jpg", jpeg(seed)),
        Entry(f"{key}.txt", text if isinstance(text, bytes) else text.encode()),
        Entry(f"{key}.json", json.dumps(sidecar).encode()),
    ]


@dataclass
class ShardCase:
    """One shard and what curation must make of it.

    ``expect``: every key the shard holds (readable or not) -> the reason it is dropped with (a
    prefix), or ``KEPT``. ``extra``: rows that are no input key (damage no key explains, members
    that came back after their key was complete) -> their reason. ``names_offset``: keys whose
    manifest detail must name the shard and a byte offset.
    """

    name: str
    data: bytes
    expect: dict[str, str | None]
    extra: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # key -> text its (kept) row's detail must hold


#: A builder gets the case's key prefix, the index of the sample to damage among 4, and the tar format.
ShardKind = Callable[[str, int, int], ShardCase]


def _keys(prefix: str, n: int = 4) -> list[str]:
    return [f"{prefix}-{i}" for i in range(n)]


def _plain(prefix: str) -> tuple[list[Entry], list[str]]:
    keys = _keys(prefix)
    return [e for k in keys for e in sample_entries(k, zlib.crc32(k.encode()))], keys


def clean(prefix: str, at: int, fmt: int) -> ShardCase:
    entries, keys = _plain(prefix)
    return ShardCase(prefix, build(entries, fmt).data, dict.fromkeys(keys, KEPT))


def _flip(data: bytes, positions: list[int]) -> bytes:
    out = bytearray(data)
    for p in positions:
        out[p] ^= 0x5A
    return bytes(out)


def corrupt_header(member: str, legible: bool = True) -> ShardKind:
    """The header of the damaged sample's ``member`` (jpg, txt, json) fails its checksum; with
    ``legible=False`` its name is garbled too."""

    def kind(prefix: str, at: int, fmt: int) -> ShardCase:
        entries, keys = _plain(prefix)
        index = 3 * at + ["jpg", "txt", "json"].index(member)
        built = build(entries, fmt)
        h = built.headers[index]
        damaged = _flip(built.data, [h + 150])
        if not legible:  # bytes that are no UTF-8
            damaged = damaged[:h] + bytes(b | 0x80 for b in damaged[h : h + 3]) + damaged[h + 3 :]
        expect: dict[str, str | None] = dict.fromkeys(keys, KEPT)
        extra: dict[str, str] = {}
        notes = {}
        if member != "json":
            expect[keys[at]] = "corrupt tar header"
        elif legible:  # the sample is whole without its sidecar: kept, the damage noted
            notes[keys[at]] = "bad tar header checksum"
        else:  # a garbled name between whole samples: a row of its own
            extra[f"@{h}"] = "corrupt tar header"
        return ShardCase(prefix, damaged, expect, extra, notes)

    kind.__name__ = f"corrupt_{member}_header" + ("" if legible else "_garbled")
    return kind


def whole_sample_unreadable(prefix: str, at: int, fmt: int) -> ShardCase:
    """Every header of one sample fails, names legible: the key is still accounted for, by name."""
    entries, keys = _plain(prefix)
    built = build(entries, fmt)
    damaged = _flip(built.data, [built.headers[3 * at + j] + 150 for j in range(3)])
    expect: dict[str, str | None] = dict.fromkeys(keys, KEPT)
    expect[keys[at]] = "corrupt tar header"
    return ShardCase(prefix, damaged, expect)


def truncated(where: str) -> ShardKind:
    """The shard ends inside the damaged sample's image data (``data``) or its caption's header (``header``)."""

    def kind(prefix: str, at: int, fmt: int) -> ShardCase:
        entries, keys = _plain(prefix)
        built = build(entries, fmt)
        cut = built.headers[3 * at] + 512 + 100 if where == "data" else built.headers[3 * at + 1] + 200
        expect: dict[str, str | None] = dict.fromkeys(keys[:at], KEPT)
        expect[keys[at]] = "truncated or unreadable shard"
        return ShardCase(prefix, built.data[:cut], expect)

    kind.__name__ = f"truncated_in_{where}"
    return kind


def concatenated(prefix: str, at: int, fmt: int) -> ShardCase:
    """Two archives in one file, the second starting at the damaged sample."""
    entries, keys = _plain(prefix)
    data = build(entries[: 3 * at], fmt).data + build(entries[3 * at :], fmt).data
    return ShardCase(prefix, data, dict.fromkeys(keys, KEPT))


def garbage_between_archives(prefix: str, at: int, fmt: int) -> ShardCase:
    """Two archives with non-tar bytes between them: a damage row of its own, every key kept."""
    entries, keys = _plain(prefix)
    first = build(entries[: 3 * at], fmt).data
    data = first + b"not a tar at all " * 100 + bytes(-1700 % 512) + build(entries[3 * at :], fmt).data
    return ShardCase(prefix, data, dict.fromkeys(keys, KEPT), extra={f"@{len(first)}": "corrupt tar header"})


def all_links(prefix: str, at: int, fmt: int) -> ShardCase:
    entries, keys = _plain(prefix)
    k = keys[at]
    entries[3 * at : 3 * at + 3] = [
        Entry(f"{k}.{ext}", target=f"../elsewhere/{k}.{ext}", kind=tarfile.SYMTYPE) for ext in ("jpg", "txt")
    ]
    expect: dict[str, str | None] = dict.fromkeys(keys, KEPT)
    expect[k] = "members are links"
    return ShardCase(prefix, build(entries, fmt).data, expect)


def image_is_a_link(prefix: str, at: int, fmt: int) -> ShardCase:
    entries, keys = _plain(prefix)
    k = keys[at]
    entries[3 * at] = Entry(f"{k}.jpg", target=f"{keys[(at + 1) % 4]}.jpg", kind=tarfile.LNKTYPE)
    expect: dict[str, str | None] = dict.fromkeys(keys, KEPT)
    expect[k] = "image is a link"
    return ShardCase(prefix, build(entries, fmt).data, expect)


def repeated_member(prefix: str, at: int, fmt: int) -> ShardCase:
    """The damaged sample has two images in a row: the first is used, the second named in the row."""
    entries, keys = _plain(prefix)
    k = keys[at]
    entries.insert(3 * at + 1, Entry(f"{k}.jpg", jpeg(999)))
    return ShardCase(prefix, build(entries, fmt).data, dict.fromkeys(keys, KEPT), notes={k: "repeats"})


def split_sample(prefix: str, at: int, fmt: int) -> ShardCase:
    """The damaged sample's caption and sidecar come after the next sample's members: joined, kept."""
    entries, keys = _plain(prefix)
    later = (at + 1) % 4
    order: list[Entry] = []
    for j in range(4):
        order += entries[3 * j : 3 * j + 1] if j == at else entries[3 * j : 3 * j + 3]
        if j == later:
            order += entries[3 * at + 1 : 3 * at + 3]
    return ShardCase(prefix, build(order, fmt).data, dict.fromkeys(keys, KEPT), notes={keys[at]: "after other keys"})


def split_and_damaged(prefix: str, at: int, fmt: int) -> ShardCase:
    """As ``split_sample``, with the image's and the caption's headers damaged: the key's row says so,
    and the damage by its image, away from the key's other members, is a row of its own."""
    entries, keys = _plain(prefix)
    later = (at + 1) % 4
    order: list[Entry] = []
    for j in range(4):
        order += entries[3 * j : 3 * j + 1] if j == at else entries[3 * j : 3 * j + 3]
        if j == later:
            order += entries[3 * at + 1 : 3 * at + 3]
    built = build(order, fmt)
    image, text = (built.headers[order.index(entries[3 * at + i])] for i in (0, 1))
    expect: dict[str, str | None] = dict.fromkeys(keys, KEPT)
    expect[keys[at]] = "corrupt tar header"
    return ShardCase(prefix, _flip(built.data, [image + 150, text + 150]), expect, extra={f"@{image}": "corrupt tar header"})


def member_after_complete(prefix: str, at: int, fmt: int) -> ShardCase:
    """A caption of the damaged sample comes again at the end of the shard, after the sample was whole."""
    entries, keys = _plain(prefix)
    k = keys[at]
    entries.append(Entry(f"{k}.txt", b"a second caption, later"))
    built = build(entries, fmt)
    if at == 3:  # right after its own members: a repeat within the sample, named in its row
        return ShardCase(prefix, built.data, dict.fromkeys(keys, KEPT), notes={k: "repeats"})
    extra = {f"{k}@{built.starts[-1]}": "key repeated after other keys"}
    return ShardCase(prefix, built.data, dict.fromkeys(keys, KEPT), extra=extra)


def sidecar(value: bytes, note: str) -> ShardKind:
    """The damaged sample's ``KEY.json`` holds ``value``: the sample is kept all the same."""

    def kind(prefix: str, at: int, fmt: int) -> ShardCase:
        entries, keys = _plain(prefix)
        entries[3 * at + 2] = Entry(f"{keys[at]}.json", value)
        return ShardCase(prefix, build(entries, fmt).data, dict.fromkeys(keys, KEPT))

    kind.__name__ = f"sidecar_{note}"
    return kind


def caption(text: bytes, reason: str | None) -> ShardKind:
    def kind(prefix: str, at: int, fmt: int) -> ShardCase:
        entries, keys = _plain(prefix)
        entries[3 * at + 1] = Entry(f"{keys[at]}.txt", text)
        expect: dict[str, str | None] = dict.fromkeys(keys, KEPT)
        expect[keys[at]] = reason
        return ShardCase(prefix, build(entries, fmt).data, expect)

    kind.__name__ = f"caption_{text[:12].hex()}"
    return kind


def oversized_member(prefix: str, at: int, fmt: int) -> ShardCase:
    """A header claims a member of 300 MiB (the file ends long before): skipped, reported, not held in memory."""
    entries, keys = _plain(prefix)
    built = build(entries[: 3 * at], fmt) if at else Built(b"", [], [], [])
    head = tarfile.TarInfo(f"{keys[at]}.jpg")
    head.size = 300 << 20
    data = built.data.rstrip(b"\0")
    data += bytes(-len(data) % 512) + head.tobuf(format=tarfile.USTAR_FORMAT) + jpeg(1) * 10
    expect: dict[str, str | None] = dict.fromkeys(keys[:at], KEPT)
    expect[keys[at]] = "member too large"
    return ShardCase(prefix, data, expect)


def dot_slash_and_folders(prefix: str, at: int, fmt: int) -> ShardCase:
    """``tar -C dir -cf x.tar .``: names start with ``./``, and folders are members."""
    entries, keys = _plain(prefix)
    folder = Entry(".", kind=tarfile.DIRTYPE)
    entries = [folder] + [Entry(f"./{e.name}", e.data) for e in entries]
    return ShardCase(prefix, build(entries, fmt).data, dict.fromkeys(keys, KEPT))


def not_a_tar(prefix: str, at: int, fmt: int) -> ShardCase:
    return ShardCase(prefix, b"<html><body>404 not found</body></html>" * 30, {}, extra={"@0": "corrupt tar header"})


SHARD_KINDS: list[ShardKind] = [
    clean,
    corrupt_header("jpg"),
    corrupt_header("txt"),
    corrupt_header("json"),
    corrupt_header("jpg", legible=False),
    corrupt_header("txt", legible=False),
    whole_sample_unreadable,
    truncated("data"),
    truncated("header"),
    concatenated,
    garbage_between_archives,
    all_links,
    image_is_a_link,
    repeated_member,
    split_sample,
    split_and_damaged,
    member_after_complete,
    sidecar(b"[1, 2, 3]", "list"),
    sidecar(b"null", "null"),
    sidecar(b'"just a string"', "string"),
    sidecar(b"{not json", "invalid"),
    sidecar(b'{"error": "crawler said so", "source": "x"}', "reserved_fields"),
    sidecar(b"[" * 100_000, "deep"),
    caption(b"\x00\x07\x1b\x7f", "empty caption"),
    caption("\u200b\u200d\ufeff".encode(), "empty caption"),
    caption("\u3164 \u2800".encode(), "empty caption"),
    caption("\u00a0\u2003\n\t".encode(), "empty caption"),
    caption(b"\xff\xfe", "caption is not UTF-8"),
    caption("caf\u00e9 \u6771\u4eac \u0623\u0647\u0644\u0627".encode(), KEPT),
    oversized_member,
    dot_slash_and_folders,
    not_a_tar,
]


def shard_cases() -> list[ShardCase]:
    """Every kind, in every tar format, with the damaged sample first, second, third and last."""
    cases = []
    for kind in SHARD_KINDS:
        for fmt_name, fmt in FORMATS.items():
            for at in range(4):
                prefix = f"{kind.__name__.replace('_', '-')}-{fmt_name}-{at}"
                cases.append(kind(prefix, at, fmt))
    return cases


# -- tables ------------------------------------------------------------------------------------


@dataclass
class TableCase:
    """A table and what curation must make of each of its data rows (counted from 0 after the header):
    ``expect[i]`` is the reason row i is dropped with (a prefix), or ``KEPT``; ``keys[i]``, where given,
    the key it must have."""

    name: str
    entry: dict
    expect: dict[int, str | None]
    keys: dict[int, str] = field(default_factory=dict)


def _write_table(path, columns: dict[str, list], fmt: str) -> None:
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet as pq

    table = pa.table(columns)
    if fmt == "parquet":
        pq.write_table(table, str(path))
    else:
        pyarrow.csv.write_csv(table, str(path))


def table_cases(folder, base_url: str) -> list[TableCase]:
    """Tables, CSV and Parquet, with the cells crawls and exports get wrong. ``base_url`` serves ``folder`` over HTTP."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("1", "2", "a.jpg", "b.jpg"):
        (folder / name).write_bytes(jpeg(zlib.crc32(name.encode())))
    cases = []
    for fmt in ("csv", "parquet"):
        cap = "title" if fmt == "csv" else "caption"

        def case(name: str, columns: dict, expect: dict, keys: dict | None = None, fmt: str = fmt, **entry) -> None:
            path = folder / f"{name}-{fmt}.{fmt}"
            _write_table(path, columns, fmt)
            cases.append(TableCase(f"{name}-{fmt}", {"type": fmt, "path": str(path), **entry}, expect, keys or {}))

        case("numeric-paths", {"filepath": [1, 2, 3], cap: ["one thing here", "two things here", "three things"]},
             {0: KEPT, 1: KEPT, 2: "image file not found"})  # fmt: skip
        case("numeric-keys", {"filepath": ["a.jpg", "b.jpg"], cap: ["a thing", "b thing"], "id": [7, 1007]},
             {0: KEPT, 1: KEPT}, {0: "7", 1: "1007"}, key_column="id")  # fmt: skip
        case("numeric-captions", {"filepath": ["a.jpg", "b.jpg", "1"], cap: [42, 3.5, None]},
             {0: KEPT, 1: KEPT, 2: "missing caption"})  # fmt: skip
        case("urls", {"filepath": [f"{base_url}/a.jpg", f"{base_url}/nowhere.jpg", "127.0.0.1/a.jpg"],
                      cap: ["fetched by URL", "a URL that is gone", "a relative path that looks like a host"]},
             {0: KEPT, 1: "image file not found", 2: "image file not found"})  # fmt: skip
        case("colliding-keys", {"filepath": ["a.jpg"] * 4, cap: ["a thing"] * 4, "id": ["x/y", "x y", "x_y", "x/y"]},
             {0: KEPT, 1: KEPT, 2: KEPT, 3: "duplicate key"}, {0: "x_y-row0", 1: "x_y-row1", 2: "x_y", 3: "x_y-row0"},
             key_column="id")  # fmt: skip
        case("missing-keys", {"filepath": ["a.jpg", "b.jpg"], cap: ["a thing", "b thing"], "id": [None, "k"]},
             {0: "missing key", 1: KEPT}, key_column="id")  # fmt: skip
        case("bad-cells", {"filepath": ["a.jpg", None, ""], cap: ["a thing", "no path", "empty path"]},
             {0: KEPT, 1: "no image path", 2: "no image path"})  # fmt: skip
    # Parquet only: typed cells
    png_bytes = jpeg(3)
    path = folder / "hf-images.parquet"
    _write_table(
        path,
        {
            "image": [{"bytes": png_bytes, "path": "x.jpg"}, {"bytes": None, "path": "a.jpg"}, {"bytes": None, "path": None}],
            "caption": ["bytes inline", "a path in the struct", "neither"],
        },
        "parquet",
    )
    cases.append(TableCase("hf-images", {"type": "parquet", "path": str(path), "image_column": "image"},
                           {0: KEPT, 1: KEPT, 2: "no image path"}))  # fmt: skip
    path = folder / "odd-captions.parquet"
    _write_table(path, {"filepath": ["a.jpg", "b.jpg", "a.jpg"],
                        "caption": [["two", "captions here"], ["a caption"], []]}, "parquet")  # fmt: skip
    cases.append(TableCase("odd-captions", {"type": "parquet", "path": str(path)}, {0: KEPT, 1: KEPT, 2: "missing caption"}))
    # CSV only: rows that are not rows
    path = folder / "ragged.csv"
    path.write_bytes(
        b'filepath,title\na.jpg,fine\nb.jpg,too,many,cells\n"a.jpg","a caption\nover two lines"\nb.jpg\n'
        b"a.jpg,caf\xe9 in latin-1\n\xff\xfe.jpg,a path that is no UTF-8\n1,the last one\n"
    )
    cases.append(TableCase("ragged", {"type": "csv", "path": str(path)},
                           {0: KEPT, 1: "malformed row", 2: KEPT, 3: "malformed row", 4: "caption is not UTF-8",
                            5: "image path is not UTF-8", 6: KEPT}))  # fmt: skip
    return cases


# -- recipes and command lines -----------------------------------------------------------------


@dataclass
class CliCase:
    """A command line that is bad input: it must exit 2 with one message holding every one of ``names``."""

    name: str
    args: list[str]
    names: list[str]


GOOD_RECIPE = """\
name: broken
storage: {root: STORE}
data:
  train: {type: synthetic-shapes, size: 10}
curation:
  - {type: caption-length, min_words: 2}
model: {type: open-clip, arch: RN50}
"""


def cli_cases(folder) -> list[CliCase]:
    """Recipes and arguments that must be refused, each written under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    good = GOOD_RECIPE.replace("STORE", str(folder / "store"))
    cases: list[CliCase] = []

    def recipe(name: str, text: str | bytes, *names: str, extra: tuple[str, ...] = ()) -> None:
        path = folder / f"{name}.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        cases.append(CliCase(name, ["validate", str(path), *extra], [*names]))

    recipe("duplicate-top-key", good + "name: again\n", "duplicate-top-key.yaml", "'name' is given twice", "line 8")
    recipe("duplicate-nested-key", good.replace("size: 10}", "size: 10, size: 20}"), "'size' is given twice", "line 4")
    recipe("duplicate-in-list", good.replace("min_words: 2}", "min_words: 2, min_words: 3}"), "'min_words' is given twice")
    recipe("object-tag", good.replace("name: broken", 'name: !!python/object/apply:os.system ["echo hi"]'),
           "object-tag.yaml", "python/object/apply:os.system")  # fmt: skip
    recipe("object-tag-nested", good.replace("size: 10", "size: !!python/name:os.getcwd ''"), "python/name:os.getcwd")
    recipe("latin-1", good.replace("broken", "caf\u00e9").encode("latin-1"), "latin-1.yaml", "not UTF-8")
    recipe("binary", bytes(range(256)) * 4, "binary.yaml", "not")
    recipe("nul-bytes", good.encode() + b"\0\0\0", "nul-bytes.yaml")
    recipe("empty", "", "empty.yaml", "must be a mapping")
    recipe("a-list", "- name: broken\n", "a-list.yaml", "must be a mapping")
    recipe("tab-indent", good.replace("  train:", "\ttrain:"), "tab-indent.yaml", "not valid YAML")
    shards = folder / "shards"
    shards.mkdir(exist_ok=True)
    (shards / "a.tar").write_bytes(b"")
    for name, urls in (
        ("glob-matches-nothing", f"'{shards}/*.tgz'"),
        ("one-glob-of-two-matches-nothing", f"['{shards}/a.tar', '{shards}/b-*.tar']"),
        ("brace-glob-matches-nothing", f"'{shards}/{{x,y}}-*.tar'"),
    ):
        pattern = "*.tgz" if "tgz" in urls else "-*.tar"
        recipe(name, good.replace("{type: synthetic-shapes, size: 10}", f"{{type: webdataset, urls: {urls}}}"),
               "data.train.urls", "no shard matches", pattern)  # fmt: skip
    recipe("whole-step-first", good.replace("  - {type: caption-length, min_words: 2}",
                                            "  - {type: exact-duplicates}\n  - {type: caption-length, min_words: 2}"),
           "curation.1 (caption-length)", "curation.0 (exact-duplicates)")  # fmt: skip
    recipe("top-fraction-first", good.replace("  - {type: caption-length, min_words: 2}",
                                              "  - {type: clip-score, model: 'models:/m@champion', fraction: 0.3}\n"
                                              "  - {type: caption-length, min_words: 2}"),
           "curation.1 (caption-length)", "curation.0 (clip-score)")  # fmt: skip
    path = folder / "good.yaml"
    path.write_text(good)
    for name, value, names in (
        ("set-unclosed", "name=[unclosed", ["--set 'name=[unclosed'", "not valid YAML"]),
        ("set-tag", "name=!!python/object/apply:os.system ['ls']", ["--set", "python/object/apply"]),
        ("set-duplicate", "data.train={type: x, type: y}", ["--set", "'type' is given twice"]),
        ("set-not-a-field", "train.nope=1", ["'train.nope' is not a field"]),
        ("set-no-equals", "train.epochs", ["expected KEY=VALUE"]),
        ("set-bad-value", "train.epochs=-1", ["train.epochs"]),
    ):
        cases.append(CliCase(name, ["validate", str(path), "--set", value], names))
    cases.append(CliCase("folder-as-recipe", ["validate", str(folder)], [str(folder), "folder"]))
    cases.append(CliCase("missing-recipe", ["validate", str(folder / "nope.yaml")], ["nope.yaml", "not found"]))
    workdir = ["--workdir", str(folder / "work")]
    for name, run_id in (("run-id-climbs", "../../etc"), ("run-id-slash", "a/b"), ("run-id-dots", ".."), ("run-id-empty", " ")):
        cases.append(CliCase(name, ["run", str(path), "--stage", "train", "--run-id", run_id, *workdir], [repr(run_id)]))
    cases.append(CliCase("rollback-unknown-model", ["rollback", "no-such-model", *workdir], ["'no-such-model'"]))
    cases.append(CliCase("promote-unknown-model", ["promote", "no-such-model", "1", *workdir], ["no-such-model"]))
    return cases
