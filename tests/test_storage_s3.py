"""The store on a real S3 endpoint (a moto server), with and without injected 503 answers;
credentials in ``storage.options`` as ``${ENV_VAR}`` references only."""

from __future__ import annotations

import pytest

from clipforge.core.errors import ConfigError, RecipeError
from clipforge.core.recipe import load_recipe
from clipforge.core.secrets import clear_text_credentials, resolve_env_refs
from clipforge.core.storage import Store
from tests.services import ACCESS_KEY, SECRET_KEY, FaultProxy, create_bucket, incomplete_uploads, list_objects, moto_s3

OPTIONS = {"key": "${CF_TEST_KEY}", "secret": "${CF_TEST_SECRET}", "endpoint_url": "${CF_TEST_ENDPOINT}"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with moto_s3(tmp_path_factory.mktemp("moto")) as endpoint:
        yield endpoint


@pytest.fixture
def creds(monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CF_TEST_KEY", ACCESS_KEY)
    monkeypatch.setenv("CF_TEST_SECRET", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def test_env_refs_resolve_at_run_time_and_missing_ones_are_named(monkeypatch):
    monkeypatch.setenv("CF_A", "alpha")
    options = {"secret": "${CF_A}", "client_kwargs": {"endpoint_url": "http://${CF_A}:9000"}, "n": 3}
    assert resolve_env_refs(options) == {"secret": "alpha", "client_kwargs": {"endpoint_url": "http://alpha:9000"}, "n": 3}
    monkeypatch.delenv("CF_A")
    with pytest.raises(ConfigError, match=r"storage.options.secret refers to \$\{CF_A\}.*not set"):
        resolve_env_refs(options)


def test_recipes_refuse_clear_text_credentials(tiny_recipe):
    assert clear_text_credentials({"key": "${K}", "secret": "${S}", "endpoint_url": "http://x"}) == []
    bad = {"key": "AKIA", "client_kwargs": {"aws_secret_access_key": "hunter2"}, "token": "x${T}"}
    assert clear_text_credentials(bad) == [
        "storage.options.key",
        "storage.options.client_kwargs.aws_secret_access_key",
        "storage.options.token",
    ]
    tiny_recipe["storage"]["options"] = {"secret": "hunter2-in-clear"}
    with pytest.raises(RecipeError, match=r"storage.options.secret") as e:
        load_recipe(tiny_recipe)
    assert "hunter2" not in str(e.value)
    tiny_recipe["storage"]["options"] = OPTIONS
    assert load_recipe(tiny_recipe).storage.options == OPTIONS  # references stay unresolved in the recipe


def test_store_on_s3_resolves_options_and_writes_whole_objects(s3, creds, monkeypatch, tmp_path):
    monkeypatch.setenv("CF_TEST_ENDPOINT", s3)
    create_bucket(s3, "plain")
    store = Store("s3://plain/prefix", OPTIONS)
    assert store.url == "s3://plain/prefix" and SECRET_KEY not in repr(store)
    assert store.options == OPTIONS  # unresolved: what sub() hands on
    assert store.write_json("a/b.json", {"x": 1}) == "s3://plain/prefix/a/b.json"
    store.put_dir(_folder(tmp_path / "src"), "dir")
    assert store.sub("a").read_json("b.json") == {"x": 1}
    assert store.ls("dir") == ["big.bin", "sub"] and store.ls("nothing") == []
    assert list_objects(s3, "plain") == {
        "prefix/a/b.json": len(b'{\n  "x": 1\n}'),
        "prefix/dir/big.bin": 3 << 20,
        "prefix/dir/sub/small.txt": 5,
    }


def test_store_survives_503_answers_and_leaves_no_partial_object(s3, creds, monkeypatch, tmp_path):
    create_bucket(s3, "faulty")
    with FaultProxy(s3, every=5).running() as proxy:
        monkeypatch.setenv("CF_TEST_ENDPOINT", proxy.url)
        store = Store("s3://faulty/p", OPTIONS)
        payloads = {f"obj-{i}.bin": bytes([i]) * (1000 * (i + 1)) for i in range(8)}
        for rel, data in payloads.items():
            store.write_bytes(rel, data)
        assert all(store.read_bytes(rel) == data for rel, data in payloads.items())
        out = store.get_dir("", tmp_path / "copy")
    assert len(proxy.failed) >= 5, proxy.failed  # faults were injected into writes and reads alike
    assert any(line.startswith("PUT") for line in proxy.failed)
    assert list_objects(s3, "faulty") == {f"p/{rel}": len(data) for rel, data in payloads.items()}
    assert incomplete_uploads(s3, "faulty") == []
    assert {p.name: p.read_bytes() for p in out.iterdir()} == payloads


def test_a_stream_to_s3_appears_whole_or_not_at_all(s3, creds, monkeypatch):
    monkeypatch.setenv("CF_TEST_ENDPOINT", s3)
    create_bucket(s3, "streams")
    store = Store("s3://streams/p", OPTIONS)
    chunk = b"\1" * (1 << 20)
    with store.open_atomic("whole.bin") as f:
        f.blocksize = 5 << 20  # S3's smallest part: 12 MiB go up as a multipart upload
        for _ in range(12):
            f.write(chunk)
    with pytest.raises(RuntimeError, match="producer failed"), store.open_atomic("half.bin") as f:
        f.blocksize = 5 << 20
        for _ in range(12):
            f.write(chunk)
        raise RuntimeError("producer failed")
    assert list_objects(s3, "streams") == {"p/whole.bin": 12 << 20}
    assert incomplete_uploads(s3, "streams") == []


def _folder(root):
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "small.txt").write_text("small")
    (root / "big.bin").write_bytes(b"\1" * (3 << 20))
    return root
