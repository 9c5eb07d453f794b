"""Curation inputs and steps: webdataset shards and tables, a corpus of bad input, filters and deduplication."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import clipforge
from clipforge.core.storage import Store
from clipforge.core.validation import load_recipe
from clipforge.engine.curation import curate


def png(color=(200, 30, 30), size=(40, 40), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def bomb() -> bytes:
    """A tiny PNG that claims more pixels than PIL's decompression-bomb limit."""
    buf = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path, members: list[tuple[str, bytes]], truncate: int | None = None) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    path.write_bytes(data[:truncate] if truncate else data)


BAD_CORPUS = [
    ("good1.png", png()),
    ("good1.txt", b"a red square on white"),
    ("good2.jpg", png((0, 0, 200), fmt="JPEG")),
    ("good2.txt", b"a blue square"),
    ("good2.json", b'{"url": "x"}'),
    ("zero.jpg", b""),
    ("zero.txt", b"a zero byte file"),
    ("html.jpg", b"<html>not an image</html>"),
    ("html.txt", b"a page saved as jpg"),
    ("bomb.png", bomb()),
    ("bomb.txt", b"a decompression bomb"),
    ("nocap.png", png()),
    ("latin1.png", png()),
    ("latin1.txt", "caf\xe9 au lait".encode("latin-1")),
    ("empty.png", png()),
    ("empty.txt", b"  \n"),
    ("huge.png", png()),
    ("huge.txt", b"word " * 200_000),
    ("../escape.png", png()),
    ("../escape.txt", b"a key that climbs out"),
    ("truncimg.png", png()[:60]),
    ("truncimg.txt", b"a truncated image"),
]

EXPECTED = {
    "zero": "empty image file",
    "html": "undecodable image",
    "bomb": "decompression bomb",
    "nocap": "missing caption",
    "latin1": "caption is not UTF-8",
    "empty": "empty caption",
    "huge": "caption longer than",
    "../escape": "invalid key",
    "truncimg": "undecodable image",
}


def _curate(tmp_path, data: dict, steps=()):
    recipe = load_recipe(
        {"name": "t", "data": {"train": data}, "curation": list(steps), "model": {"type": "open-clip", "arch": "RN50"}}
    )
    store = Store(str(tmp_path / "store"))
    summary = curate(recipe, clipforge.get_plugin_manager().catalog, store, "cur", progress=False)
    rows = pq.read_table(store.path(summary.manifest)).to_pylist()
    return summary, {r["key"]: r for r in rows}


def test_bad_input_corpus_is_dropped_with_reasons_and_the_run_goes_on(tmp_path):
    write_tar(tmp_path / "shard-000000.tar", BAD_CORPUS)
    write_tar(tmp_path / "shard-000001.tar", [("later.png", png()), ("later.txt", b"a sample after the damage")])
    write_tar(
        tmp_path / "shard-000002.tar",
        [("ok3.png", png()), ("ok3.txt", b"fine sample"), ("cut.png", png() * 40), ("cut.txt", b"x")],
        truncate=3000,
    )
    summary, rows = _curate(tmp_path, {"type": "webdataset", "urls": str(tmp_path / "shard-{000000..000002}.tar")})
    for key, reason in EXPECTED.items():
        assert not rows[key]["kept"] and rows[key]["reason"].startswith(reason), (key, rows[key]["reason"])
    assert {k for k, r in rows.items() if r["kept"]} == {"good1", "good2", "later", "ok3"}
    assert rows["cut"]["reason"].startswith("truncated or unreadable shard")
    assert summary.input == len(rows) and summary.kept == 4
    assert sum(v.dropped for v in summary.funnel.values()) == summary.input - 4


def test_the_bad_corpus_gets_the_same_verdicts_behind_filters_that_read_no_pixels(tmp_path):
    """Images are only opened until a step reads pixels: a truncated image still drops at decode, counted as if decoded first."""
    write_tar(tmp_path / "shard-000000.tar", [*BAD_CORPUS, ("short.png", png()[:60]), ("short.txt", b"x")])
    steps = [{"type": "caption-length", "min_words": 2}, {"type": "image-size", "min_side": 10}]
    summary, rows = _curate(tmp_path, {"type": "webdataset", "urls": str(tmp_path / "shard-000000.tar")}, steps)
    for key, reason in EXPECTED.items():
        assert not rows[key]["kept"] and rows[key]["step"] == "decode" and rows[key]["reason"].startswith(reason), rows[key]
    # a truncated image with a one-word caption is dropped by the caption filter, never decoded
    assert rows["short"]["step"] == "caption-length" and rows["short"]["reason"].startswith("too few words")
    funnel = summary.funnel
    assert funnel["caption-length"].seen == funnel["decode"].kept == len(rows) - len(EXPECTED)
    assert funnel["image-size"].seen == funnel["caption-length"].kept == 2 and summary.kept == 2


def test_webdataset_glob_and_missing_shards(tmp_path):
    write_tar(tmp_path / "a.tar", [("k1.png", png()), ("k1.txt", b"one red square")])
    write_tar(tmp_path / "b.tar", [("k2.png", png()), ("k2.txt", b"two red squares")])
    ds = clipforge.get_plugin_manager().catalog.create("datasets", {"type": "webdataset", "urls": str(tmp_path / "*.tar")})
    assert [s.key for s in ds] == ["k1", "k2"]
    with pytest.raises(clipforge.ConfigError, match="no shard matches"):
        clipforge.get_plugin_manager().catalog.create("datasets", {"type": "webdataset", "urls": str(tmp_path / "*.zip")})


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_tables_resolve_relative_paths_and_report_missing_files(tmp_path, fmt):
    import pyarrow as pa
    import pyarrow.csv

    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png())
    column = "title" if fmt == "csv" else "caption"  # open_clip_train's and img2dataset's defaults
    table = pa.table({"filepath": ["img/a.png", "img/missing.png", None], column: ["a red square", "lost", "no path"]})
    path = tmp_path / f"pairs.{fmt}"
    (pq.write_table if fmt == "parquet" else pyarrow.csv.write_csv)(table, str(path))
    _, rows = _curate(tmp_path, {"type": fmt, "path": str(path)})
    assert rows["000000000"]["kept"]
    assert rows["000000001"]["reason"] == "image file not found"
    assert rows["000000002"]["reason"] == "no image path"
    with pytest.raises(clipforge.ConfigError, match="no column 'url'"):
        clipforge.get_plugin_manager().catalog.create("datasets", {"type": fmt, "path": str(path), "image_column": "url"})


class _Pairs:
    def __init__(self, samples):
        self.samples = samples

    def __iter__(self):
        return iter(self.samples)


def _run_step(entry, samples):
    step = clipforge.get_plugin_manager().catalog.create("curation_steps", entry)
    if isinstance(step, clipforge.WholeDatasetStep):
        return step.decide([s.key for s in samples], step.features(samples))
    return step(samples)


def test_image_size_filter():
    samples = [
        clipforge.Sample(str(i), Image.new("RGB", size), "x y") for i, size in enumerate([(300, 250), (150, 400), (900, 250)])
    ]
    v = _run_step({"type": "image-size", "min_side": 200, "max_aspect": 3}, samples)
    assert [x.keep for x in v] == [True, False, False]
    assert v[1].reason.startswith("image too small") and v[2].reason.startswith("aspect ratio too large")


def test_exact_duplicates_by_image_and_by_caption():
    red, blue = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")
    samples = [
        clipforge.Sample("a", red, "A red!"),
        clipforge.Sample("b", red.copy(), "a red"),
        clipforge.Sample("c", blue, "a red"),
    ]
    by_image = _run_step({"type": "exact-duplicates"}, samples)
    assert [x.keep for x in by_image] == [True, False, True] and by_image[1].detail == "of a"
    by_pair = _run_step({"type": "exact-duplicates", "by": "image+caption"}, samples)
    assert [x.keep for x in by_pair] == [True, False, True]  # "A red!" and "a red" normalise alike


def test_near_duplicates_keep_the_first_of_each_cluster():
    rng = np.random.default_rng(0)
    base = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(60)]
    copies = [im.resize((64, 64)).resize((32, 32)) for im in base[:10]]  # resized and back
    samples = [clipforge.Sample(f"o{i}", im, "x y") for i, im in enumerate(base)]
    samples += [clipforge.Sample(f"c{i}", im, "x y") for i, im in enumerate(copies)]
    samples.append(clipforge.Sample("c0-again", copies[0].copy(), "x y"))
    verdicts = _run_step({"type": "near-duplicates", "threshold": 0.95}, samples)
    assert all(v.keep for v in verdicts[:60])
    assert [v.detail for v in verdicts[60:]] == [f"of o{i}" for i in range(10)] + ["of o0"]
    assert all(v.scores["similarity"] >= 0.95 for v in verdicts[60:])


def test_near_neighbours_finds_planted_duplicates_without_comparing_all_pairs():
    from clipforge.plugins.curation.duplicates import near_pairs

    rng = np.random.default_rng(1)
    x = rng.standard_normal((20_000, 64)).astype(np.float32)
    planted = rng.choice(20_000, 200, replace=False)
    x[planted[100:]] = x[planted[:100]] + 0.05 * rng.standard_normal((100, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    i, j, _ = near_pairs(x, 0.95, exact_below=10_000)  # above exact_below: the search cell by cell
    pairs = set(zip(i.tolist(), j.tolist()))
    found = sum((min(a, b), max(a, b)) in pairs for a, b in zip(planted[:100].tolist(), planted[100:].tolist()))
    assert found >= 99


def test_clip_score_top_fraction_decides_over_the_whole_dataset():
    from clipforge.plugins.curation.clip_score import ClipScoreTop

    step = ClipScoreTop.__new__(ClipScoreTop)
    step.fraction = 0.3
    verdicts = step.decide([str(i) for i in range(10)], [0.1, 0.9, 0.5, 0.3, 0.8, 0.2, 0.7, 0.4, 0.6, 0.0])
    assert [i for i, v in enumerate(verdicts) if v.keep] == [1, 4, 6]
    assert verdicts[0].reason == "clip score not in the top 30%"


def test_balance_caps_head_entries_and_keeps_the_tail():
    samples = [clipforge.Sample(f"cat{i}", None, f"a photo of a cat number {i}") for i in range(200)]
    samples += [clipforge.Sample(f"dog{i}", None, f"my dog {i}") for i in range(5)]
    samples += [clipforge.Sample("hotdog", None, "a hotdog stand"), clipforge.Sample("none", None, "nothing here")]
    entry = {"type": "balance", "entries": ["cat", "dog", "hot dog"], "t": 20, "seed": 0}
    verdicts = dict(zip([s.key for s in samples], _run_step(entry, samples)))
    kept_cats = sum(verdicts[f"cat{i}"].keep for i in range(200))
    assert 8 <= kept_cats <= 35  # each kept with probability 20/200
    assert all(verdicts[f"dog{i}"].keep for i in range(5))  # the tail is kept whole
    assert not verdicts["hotdog"].keep and verdicts["hotdog"].reason == "matches no entry"  # whole words only
    assert verdicts == dict(zip([s.key for s in samples], _run_step(entry, samples)))  # seeded


def test_a_per_sample_step_after_a_whole_dataset_step_is_refused(tmp_path):
    with pytest.raises(clipforge.ConfigError, match=r"curation.1 \(caption-length\) decides sample by sample"):
        _curate(tmp_path, {"type": "synthetic-shapes", "size": 10}, [{"type": "near-duplicates"}, {"type": "caption-length"}])


def test_clip_score_keeps_pairs_above_the_threshold(tmp_path):
    from clipforge.core.checkpoint import save_open_clip_dir
    from tests.conftest import TINY_CONFIG

    bundle = clipforge.get_plugin_manager().catalog.create("encoders", {"type": "open-clip", "config": TINY_CONFIG})
    folder = save_open_clip_dir(bundle, tmp_path / "scorer")
    samples = [
        clipforge.Sample(str(i), Image.new("RGB", (32, 32), c), f"a {c} square") for i, c in enumerate(["red", "blue", "green"])
    ]
    step = clipforge.get_plugin_manager().catalog.create(
        "curation_steps", {"type": "clip-score", "model": str(folder), "threshold": -1.0}
    )
    scores = [v.scores["score"] for v in step(samples)]
    assert all(-1.0 <= s <= 1.0 for s in scores)
    cut = sorted(scores)[1]
    strict = clipforge.get_plugin_manager().catalog.create(
        "curation_steps", {"type": "clip-score", "model": str(folder), "threshold": cut}
    )
    assert [v.keep for v in strict(samples)] == [s >= cut for s in scores]
    with pytest.raises(clipforge.ConfigError, match="not a registered model"):
        clipforge.get_plugin_manager().catalog.create(
            "curation_steps", {"type": "clip-score", "model": str(tmp_path), "threshold": 0.2}
        )
