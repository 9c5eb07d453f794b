"""Pre-flight: ``clipforge validate`` refuses, with exit 2 and the field, what a run would fail on minutes later."""

from __future__ import annotations

import copy
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clipforge.cli import main
from clipforge.core.plugins import get_plugin_manager
from clipforge.core.validation import load_recipe
from clipforge.engine.preflight import check_storage_root, preflight
from tests.conftest import TINY_RECIPE, write_yaml

COLUMN = st.text(string.ascii_lowercase + "_", min_size=1, max_size=12)


def _errors(data):
    return preflight(load_recipe(data), get_plugin_manager().catalog)


def _recipe(tmp_path, **changes):
    data = copy.deepcopy(TINY_RECIPE)
    data["storage"] = {"root": str(tmp_path / "store")}
    for path, value in changes.items():
        *parents, last = path.split(".")
        node = data
        for p in parents:
            node = node[p]
        node[last] = value
    return data


def test_the_tiny_recipe_passes(tmp_path):
    assert _errors(_recipe(tmp_path)) == []


@settings(max_examples=15, deadline=None)
@given(columns=st.lists(COLUMN, min_size=2, max_size=5, unique=True), fmt=st.sampled_from(["csv", "parquet"]))
def test_a_table_must_have_the_columns_its_entry_reads(tmp_path_factory, columns, fmt):
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet

    folder = tmp_path_factory.mktemp("t")
    table = pa.table({c: ["x"] for c in columns})
    path = folder / f"t.{fmt}"
    (pyarrow.parquet.write_table if fmt == "parquet" else pyarrow.csv.write_csv)(table, str(path))
    good = {"type": fmt, "path": str(path), "image_column": columns[0], "caption_column": columns[1]}
    data = _recipe(folder, **{"data.train": good})
    assert _errors(data) == []
    missing = "".join(columns) + "_x"  # no column of the table
    data["data"]["train"] = {**good, "caption_column": missing}
    errors = _errors(data)
    assert [p for p, _ in errors] == ["data.train.caption_column"]
    assert missing in errors[0][1] and str(path) in errors[0][1] and all(c in errors[0][1] for c in columns)
    data["data"]["train"] = {**good, "path": str(folder / "nowhere")}
    assert [p for p, _ in _errors(data)] == ["data.train.path"]


def test_the_defaults_of_a_csv_are_named_when_they_are_missing(tmp_path):
    (tmp_path / "t.csv").write_text("image,text\na.png,a cat\n")
    errors = dict(_errors(_recipe(tmp_path, **{"data.train": {"type": "csv", "path": str(tmp_path / "t.csv")}})))
    assert "'filepath'" in errors["data.train.image_column"] and "'title'" in errors["data.train.caption_column"]


@pytest.mark.parametrize("where", ["data.eval", "evaluation.0.dataset"])
def test_an_evaluator_that_needs_classes_refuses_a_set_without_them(tmp_path, where):
    (tmp_path / "t.csv").write_text("filepath,title\na.png,a cat\n")
    table = {"type": "csv", "path": str(tmp_path / "t.csv")}
    data = _recipe(tmp_path)
    if where == "data.eval":
        data["data"]["eval"] = table
    else:
        data["evaluation"][0]["dataset"] = table
    errors = _errors(data)
    assert [p for p, _ in errors] == ["evaluation.0"]
    assert "zero-shot-classification needs classes" in errors[0][1] and where in errors[0][1]


def test_an_entries_file_that_does_not_exist(tmp_path):
    data = _recipe(tmp_path)
    data["curation"].append({"type": "balance", "entries_file": str(tmp_path / "entries.txt")})
    assert [p for p, _ in _errors(data)] == ["curation.1.entries_file"]
    (tmp_path / "entries.txt").write_text("circle\nsquare\n")
    assert _errors(data) == []


@settings(max_examples=20, deadline=None)
@given(depth=st.integers(0, 3), under_file=st.booleans())
def test_a_storage_root_under_a_file_or_a_missing_folder(tmp_path_factory, depth, under_file):
    base = tmp_path_factory.mktemp("s")
    (base / "f").write_text("")
    parts = ["f" if under_file else "d", *[f"n{i}" for i in range(depth)], "store"]
    root = str(base.joinpath(*parts))
    errors = check_storage_root(root)
    # under a file at any depth, or under a folder d that does not exist
    assert len(errors) == 1 and ("is a file" if under_file else "does not exist") in errors[0][1]
    assert check_storage_root(str(base / "store")) == [] and check_storage_root("s3://bucket/prefix") == []


def test_validate_exits_2_naming_every_problem(tmp_path, capsys):
    data = _recipe(tmp_path)
    data["storage"]["root"] = str(tmp_path / "missing" / "store")
    data["data"]["eval"] = {"type": "csv", "path": str(tmp_path / "nope.csv")}
    data["train"]["init_from"] = f"local-dir:{tmp_path / 'nothing'}"
    path = write_yaml(tmp_path / "r.yaml", data)
    assert main(["validate", str(path), "--offline"]) == 2
    err = capsys.readouterr().err
    for field in ("storage.root", "data.eval.path", "train.init_from"):
        assert field in err
    assert str(path) in err and "Traceback" not in err


@pytest.mark.parametrize("if_missing", ["scratch", "pretrained", "fail", None])
def test_a_warm_start_that_says_what_its_absence_means_is_not_refused_before_it_exists(if_missing):
    from clipforge.registry.references import model_references

    start = {"model": "models:/nobody@champion", **({"if_missing": if_missing} if if_missing else {})}
    data = {"train": {"init_from": start}, "curation": [{"type": "clip-score", "model": "local-dir:/nowhere"}]}
    found = dict(model_references(data))
    assert found.pop("curation.0.model") == "local-dir:/nowhere"
    assert found == ({} if if_missing in ("scratch", "pretrained") else {"train.init_from.model": "models:/nobody@champion"})
    plain = dict(model_references({"train": {"init_from": "models:/nobody@champion"}}))
    assert plain == {"train.init_from": "models:/nobody@champion"}  # the plain string keeps failing when missing
