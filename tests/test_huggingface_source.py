"""The ``huggingface`` dataset: local parquet, arrow and imagefolder data made with ``datasets``, with
captions in many languages and damaged rows; every row is one manifest row, whatever the mode and parts."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import clipforge
from clipforge.cli import main
from clipforge.core.storage import Store
from clipforge.core.validation import load_recipe
from clipforge.engine.curation import curate
from clipforge.engine.shards import iter_shard
from clipforge.plugins.datasets.huggingface import HuggingFaceDataset
from tests.conftest import write_yaml

datasets = pytest.importorskip("datasets")

CAPTIONS = [
    "a black cat sleeping on a sofa", "un café au lait sur la table", "naïve Malerei über dem Sofa",
    "東京タワーの夜景", "北京的猫在睡觉", "แมวดำนอนบนโซฟา", "кот спит на диване", "ένας μαύρος σκύλος",
    "قطة سوداء نائمة", "서울 타워의 야경", "la tour Eiffel la nuit", "Ein HUND im Schnee",
]  # fmt: skip
# damage -> the reason curation records for it
DAMAGE = {
    "corrupt": "undecodable image (UnidentifiedImageError)",
    "empty-image": "empty image file",
    "no-image": "no image",
    "no-caption": "missing caption",
    "blank-caption": "empty caption",
}


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """Prepared datasets go to this test's folder, never the user's cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def _png(rng: random.Random) -> bytes:
    pixels = np.array([[[rng.randrange(256) for _ in range(3)] for _ in range(8)] for _ in range(8)], dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _rows(n: int, seed: int, damage_rate: float = 0.3) -> list[dict]:
    """``n`` rows: an image, a caption (or a list of them), and what damage was done (None: none)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        caption: str | list[str] | None = f"{rng.choice(CAPTIONS)} {i}"
        if rng.random() < 0.15:
            caption = [str(caption), rng.choice(CAPTIONS)]
        row = {"image": _png(rng), "text": caption, "damage": None}
        if rng.random() < damage_rate:
            row["damage"] = kind = rng.choice(list(DAMAGE))
            if kind == "corrupt":
                row["image"] = b"\x89PNG\r\n\x1a\n but broken"
            elif kind == "empty-image":
                row["image"] = b""
            elif kind == "no-image":
                row["image"] = None
            elif kind == "no-caption":
                row["text"] = None
            else:
                row["text"] = " \u200b "
        rows.append(row)
    return rows


def _as_dataset(rows: list[dict]):
    """Single captions as a string column (lists go in their own dataset: a column holds one type)."""
    return datasets.Dataset.from_dict({
        "image": [None if r["image"] is None else {"bytes": r["image"], "path": None} for r in rows],
        "text": [r["text"] for r in rows],
        "uid": [f"u/{i}" for i in range(len(rows))],
    }).cast_column("image", datasets.Image())  # fmt: skip


def _single(rows: list[dict]) -> list[dict]:
    return [r | {"text": r["text"][0]} if isinstance(r["text"], list) else r for r in rows]


def write_parquet(folder: Path, rows: list[dict], files: int) -> str:
    """``rows`` in ``files`` parquet files: the shards a streamed split is read in."""
    folder.mkdir(parents=True)
    ds = _as_dataset(rows)
    for i in range(files):
        ds.shard(files, i, contiguous=True).to_parquet(str(folder / f"train-{i:05d}.parquet"))
    return str(folder)


def write_imagefolder(folder: Path, rows: list[dict]) -> str:
    """An imagefolder: one file per image, captions in metadata.jsonl (a row without an image has none)."""
    folder.mkdir(parents=True)
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            (folder / f"{i:04d}.png").write_bytes(row["image"] or b"")
            f.write(json.dumps({"file_name": f"{i:04d}.png", "text": row["text"]}, ensure_ascii=False) + "\n")
    return str(folder)


def expected_reason(row: dict) -> str | None:
    if row["damage"] == "no-image" and row.get("imagefolder"):
        return "empty image file"
    return DAMAGE.get(row["damage"]) if row["damage"] else None


def run_curation(tmp_path: Path, entry: dict, name: str, runner: str = "threads"):
    recipe = load_recipe({
        "name": "hf", "storage": {"root": str(tmp_path / "store")},
        "data": {"train": {"type": "huggingface", **entry}},
        "curation": [{"type": "caption-length", "min_words": 1, "min_chars": 1}],
        "model": {"type": "open-clip", "arch": "RN50"}, "parallel": {"runner": runner, "shard_size": 7},
    })  # fmt: skip
    store = Store(recipe.storage.root)
    summary = curate(recipe, clipforge.get_plugin_manager().catalog, store, name, progress=False)
    manifest = pq.read_table(store.path(summary.manifest)).to_pylist()
    kept = {s["key"]: s for shard in summary.shards for s in iter_shard(store, shard.path)}
    return summary, manifest, kept


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def check_accounting(rows: list[dict], summary, manifest: list[dict], kept: dict) -> None:
    """Every row is one manifest row, with the verdict its damage calls for; what is kept is what the data holds."""
    keys = [f"train-{i:09d}" for i in range(len(rows))]
    assert sorted(r["key"] for r in manifest) == keys and summary.input == len(rows)
    by_key = {r["key"]: r for r in manifest}
    for key, row in zip(keys, rows):
        reason = expected_reason(row)
        assert by_key[key]["kept"] == (reason is None), (key, row["damage"], by_key[key])
        if reason is not None:
            assert by_key[key]["reason"] == reason and by_key[key]["detail"], by_key[key]
    assert set(kept) == {k for k, row in zip(keys, rows) if expected_reason(row) is None} and summary.kept == len(kept)
    for key, row in zip(keys, rows):
        if key in kept:
            assert kept[key]["caption"] == row["text"]
            assert np.array_equal(_pixels(kept[key]["image"]), _pixels(row["image"]))


def _verdicts(manifest: list[dict]) -> list[tuple]:
    return sorted((r["key"], r["kept"], r["step"], r["reason"]) for r in manifest)


def test_parquet_streamed_or_prepared_in_any_parts_gives_every_row_its_verdict(tmp_path):
    rows = _single(_rows(41, seed=3))
    path = write_parquet(tmp_path / "pq", rows, files=4)
    results = {}
    for streaming, parts in [(True, None), (True, 2), (False, 3), (False, 1)]:
        summary, manifest, kept = run_curation(
            tmp_path, {"path": path, "streaming": streaming, "parts": parts}, f"c-{streaming}-{parts}"
        )
        check_accounting(rows, summary, manifest, kept)
        results[streaming, parts] = _verdicts(manifest)
    assert len(set(map(tuple, results.values()))) == 1


def test_arrow_saved_to_disk_with_caption_lists(tmp_path):
    rows = _rows(30, seed=5)
    lists = [r | {"text": r["text"] if isinstance(r["text"], list) or r["text"] is None else [r["text"]]} for r in rows]
    # a list with a blank caption is dropped as a whole, as in the other sources
    lists = [r | {"text": [" \u200b "]} if r["damage"] == "blank-caption" else r for r in lists]
    ds = _as_dataset(lists)
    ds.save_to_disk(str(tmp_path / "saved"))
    single_file = next((tmp_path / "saved").glob("*.arrow"))
    for entry in [{"path": str(tmp_path / "saved"), "streaming": True, "parts": 3},
                  {"path": str(tmp_path / "saved"), "streaming": False},
                  {"path": str(single_file), "streaming": True}]:  # fmt: skip
        summary, manifest, kept = run_curation(tmp_path, entry, f"c-{len(entry)}-{entry['streaming']}")
        check_accounting(lists, summary, manifest, kept)


def test_imagefolder_with_metadata(tmp_path):
    rows = [r | {"imagefolder": True} for r in _single(_rows(24, seed=8))]
    path = write_imagefolder(tmp_path / "images", rows)
    verdicts = []
    for streaming in (True, False):
        summary, manifest, kept = run_curation(tmp_path, {"path": path, "streaming": streaming}, f"c-{streaming}")
        check_accounting(rows, summary, manifest, kept)
        verdicts.append(_verdicts(manifest))
    assert verdicts[0] == verdicts[1]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 40), files=st.integers(1, 5), parts=st.integers(1, 8), seed=st.integers(0, 10_000),
       streaming=st.booleans(), keyed=st.booleans())  # fmt: skip
def test_parts_together_are_the_whole_split_in_order(tmp_path_factory, n, files, parts, seed, streaming, keyed):
    rows = _single(_rows(n, seed=seed, damage_rate=0.5))
    files = min(files, n)
    path = write_parquet(tmp_path_factory.mktemp("pq") / "data", rows, files=files)
    entry = {"path": path, "streaming": streaming, "parts": parts, "key_column": "uid" if keyed else None}

    def seen(dataset):
        return [(s.key, s.caption, s.image, s.meta.get("error")) for s in dataset]

    whole = seen(HuggingFaceDataset(**entry))
    entries = HuggingFaceDataset(**entry).parts()
    assert 1 <= len(entries) <= (min(parts, files) if streaming else min(parts, n))
    assert [s for e in entries for s in seen(HuggingFaceDataset(**{k: v for k, v in e.items() if k != "type"}))] == whole
    keys = [k for k, *_ in whole]
    assert len(set(keys)) == n  # distinct raw keys stay distinct once made store-safe
    if keyed:  # "u/7" is no store key: its safe form and a hash of it
        assert all(k.startswith(f"u_{i}-") for i, k in enumerate(keys))
    else:
        assert keys == [f"train-{i:09d}" for i in range(n)]


def test_a_file_that_breaks_off_is_one_row_with_its_reason(tmp_path):
    rows = _single(_rows(12, seed=2, damage_rate=0))
    path = write_parquet(tmp_path / "pq", rows, files=2)
    broken = sorted(Path(path).glob("*.parquet"))[1]
    broken.write_bytes(broken.read_bytes()[:-200])
    samples = list(HuggingFaceDataset(path=path, streaming=True))
    assert [s.key for s in samples[:6]] == [f"train-{i:09d}" for i in range(6)]
    assert all("error" not in s.meta for s in samples[:6])
    assert len(samples) == 7 and samples[6].key == "train-000000006-unreadable"
    assert samples[6].meta["error"].startswith("unreadable from here on")


def test_missing_columns_name_the_field_and_list_the_columns(tmp_path, tiny_recipe, capsys):
    path = write_parquet(tmp_path / "pq", _single(_rows(5, seed=1, damage_rate=0)), files=1)
    with pytest.raises(clipforge.ConfigError, match=r"no column 'caption' \(set caption_column\); columns: image, text, uid"):
        HuggingFaceDataset(path=path, caption_column="caption")
    recipe = tiny_recipe | {"data": tiny_recipe["data"] | {"train": {"type": "huggingface", "path": path, "image_column": "img"}}}
    assert main(["validate", str(write_yaml(tmp_path / "r.yaml", recipe))]) == 2
    err = capsys.readouterr().err
    assert "data.train.image_column" in err and "no column 'img'" in err and "columns: image, text, uid" in err
    assert "Traceback" not in err
    recipe["data"]["train"] = {"type": "huggingface", "path": path, "split": "validation"}
    assert main(["validate", str(write_yaml(tmp_path / "r.yaml", recipe))]) == 2
    err = capsys.readouterr().err
    assert "data.train.split" in err and "validation" in err
    recipe["data"]["train"] = {"type": "huggingface", "path": str(tmp_path / "nowhere")}
    assert main(["validate", str(write_yaml(tmp_path / "r.yaml", recipe))]) == 2
    assert "data.train.path" in capsys.readouterr().err
