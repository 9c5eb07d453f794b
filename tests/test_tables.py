"""The ``csv`` dataset: open_clip_train's CSV layout as clipforge samples."""

from __future__ import annotations

import pytest
from PIL import Image

import clipforge
from clipforge.core.errors import ConfigError


def _table(tmp_path, header="filepath,title"):
    (tmp_path / "img").mkdir()
    for name, colour in (("a", "red"), ("b", "blue")):
        Image.new("RGB", (8, 8), colour).save(tmp_path / "img" / f"{name}.png")
    table = tmp_path / "train.csv"
    table.write_text(f'{header}\nimg/a.png,a red square\n{tmp_path}/img/b.png,"a blue square, small"\nimg/missing.png,a ghost\n')
    return table


def test_csv_rows_become_samples_with_paths_relative_to_the_file(tmp_path):
    table = _table(tmp_path)
    samples = list(clipforge.get_plugin_manager().catalog.create("datasets", {"type": "csv", "path": str(table)}))
    assert [s.caption for s in samples] == ["a red square", "a blue square, small", "a ghost"]
    assert samples[0].image == (tmp_path / "img" / "a.png").read_bytes()
    assert samples[1].image == (tmp_path / "img" / "b.png").read_bytes()
    assert samples[2].image is None and samples[2].meta["error"] == "image file not found"  # curation drops it
    assert len({s.key for s in samples}) == 3


def test_a_missing_column_is_named(tmp_path):
    table = _table(tmp_path, header="path,caption")
    with pytest.raises(ConfigError, match="no column 'filepath', 'title'"):
        list(clipforge.get_plugin_manager().catalog.create("datasets", {"type": "csv", "path": str(table)}))
    entry = {"type": "csv", "path": str(table), "image_column": "path", "caption_column": "caption"}
    assert len(list(clipforge.get_plugin_manager().catalog.create("datasets", entry))) == 3
