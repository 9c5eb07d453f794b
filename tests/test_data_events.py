"""New data starts retrains: the clipforge.data.arrived event, and the location it points a recipe at.

The whole path, against a real Prefect server, is in tests/test_deployments.py."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clipforge.cli import main
from clipforge.core.errors import ConfigError
from clipforge.core.overrides import apply_overrides
from clipforge.core.validation import load_recipe
from clipforge.flows.events import DATA_ARRIVED, data_resource, emit_data_arrived
from clipforge.flows.retrain import location_override
from tests.conftest import TINY_RECIPE, write_yaml
from tests.crawls import CrawlSample, encode, noise_pixels, write_shards


def _recipe(tmp_path, train: dict) -> str:
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["data"]["train"] = train
    return str(write_yaml(tmp_path / "recipe.yaml", recipe))


def _shards(folder) -> str:
    samples = [CrawlSample(f"k{i}", encode(noise_pixels(i, 16)), f"a photo number {i}", ext="png") for i in range(4)]
    return write_shards(folder, samples, per_shard=2)


def test_the_location_replaces_a_webdatasets_urls(tmp_path):
    path = _recipe(tmp_path, {"type": "webdataset", "urls": _shards(tmp_path / "old")})
    new = _shards(tmp_path / "new")
    override = location_override(path, [], new)
    assert override.startswith("data.train.urls=")
    assert load_recipe(path, [override]).data.train.fields["urls"] == new


# Locations with what YAML would read as something else: a mapping, a comment, a number, a list.
@settings(max_examples=60, deadline=None)
@given(
    location=st.one_of(
        st.sampled_from(["{00000..00009}.tar", "s3://b/x: y #z", "123", "[a, b]", "null", "'quoted'", "~/x.csv", "a\\b"]),
        st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=40),
    )
)
def test_any_location_reaches_the_recipe_as_the_same_string(tmp_path_factory, location):
    folder = tmp_path_factory.mktemp("table")
    (folder / "t.csv").write_text("filepath,title\n")
    path = _recipe(folder, {"type": "csv", "path": str(folder / "t.csv")})
    override = location_override(path, [], location)
    assert override.startswith("data.train.path=")
    assert apply_overrides({"data": {"train": {"type": "csv", "path": "t.csv"}}}, [override])["data"]["train"]["path"] == location


def test_a_dataset_without_a_location_is_refused_naming_it(tmp_path):
    path = _recipe(tmp_path, {"type": "synthetic-shapes", "size": 10})
    with pytest.raises(ConfigError, match="'synthetic-shapes' has no location field \\(urls or path\\)"):
        location_override(path, [], "s3://bucket/new/{0..9}.tar")
    # the overrides apply first: a recipe whose training data an override replaced is pointed at the new data
    override = location_override(path, ["data.train={type: parquet, path: x.parquet}"], "s3://bucket/new.parquet")
    assert override == 'data.train.path="s3://bucket/new.parquet"'


def test_the_event_names_its_stream_and_refuses_a_bad_one():
    assert data_resource("shapes-crawl") == {
        "prefect.resource.id": "clipforge.data.shapes-crawl",
        "prefect.resource.name": "shapes-crawl",
    }
    assert DATA_ARRIVED == "clipforge.data.arrived"
    for bad in ["", "two words", "-x", "a/b", "é"]:
        with pytest.raises(ConfigError, match="stream"):
            data_resource(bad)


def test_without_a_prefect_server_nothing_is_emitted(monkeypatch, capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with pytest.raises(ConfigError, match="PREFECT_API_URL is not set"):
            emit_data_arrived("s3://b/{0..9}.tar", "crawl")
        assert main(["data-arrived", "s3://b/{0..9}.tar", "--stream", "crawl"]) == 2
    assert "PREFECT_API_URL" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="empty"):
        emit_data_arrived("  ", "crawl")
    assert main(["data-arrived", "s3://b/x.tar", "--stream", "no good"]) == 2
