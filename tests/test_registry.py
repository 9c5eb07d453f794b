"""clipforge.registry against a real MLflow: a SQLite store in each test's tmp_path.

The pyfunc is logged, loaded and compared with open_clip run by hand on the same folder; the
registry tests move aliases through every rule of promotion, also from threads and processes
promoting at once.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import random
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlflow import MlflowClient
from PIL import Image

from clipforge.core.checkpoint import save_open_clip_dir
from clipforge.core.components import EncoderBundle
from clipforge.core.metrics import metric_key
from clipforge.registry import (
    PromotionError,
    champion_metrics,
    default_tracking_uri,
    ensure_experiment,
    log_pyfunc_model,
    mlflow_ui_command,
    promote_if_better,
    register_version,
    render_model_card,
    rollback,
    set_champion,
)
from clipforge.registry.tracking import log_active_run_metrics as log_metrics

TINY_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 32, "width": 64, "heads": 2, "layers": 2},
}
METRIC = "retrieval/mean_recall@1"
MODEL = "shapes-clip"


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def template_db(tmp_path_factory) -> Path:
    """An empty, migrated MLflow database: creating one takes seconds, copying it milliseconds."""
    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    uri = f"sqlite:///{path}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.search_experiments()
    client.search_registered_models()
    return path


@pytest.fixture
def store(tmp_path, monkeypatch, template_db) -> str:
    """This test's own tracking and registry URI; nothing of it outlives the test."""
    shutil.copy(template_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # not default_tracking_uri: it would honour a leaked env variable
    # mlflow.set_tracking_uri would leave a module global behind: reset it and go through the env
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)
    monkeypatch.setattr(mlflow.tracking._model_registry.utils, "_registry_uri", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("CLIPFORGE_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.chdir(tmp_path)  # anything MLflow writes relative to the cwd stays here
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny open_clip model saved as a ``local-dir:`` folder, built with open_clip only."""
    import open_clip

    cfg_dir = tmp_path_factory.mktemp("cfg")
    (cfg_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG}))
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(f"local-dir:{cfg_dir}")
    bundle = EncoderBundle(
        model=model,
        tokenizer=open_clip.get_tokenizer(f"local-dir:{cfg_dir}"),
        preprocess_train=preprocess_train,
        preprocess_val=preprocess_val,
        arch=TINY_CFG,
        preprocess_cfg=dict(model.visual.preprocess_cfg),
    )
    return save_open_clip_dir(bundle, tmp_path_factory.mktemp("model") / "open_clip")


def png(seed: int, size: int = 40) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def reference_embeddings(model_dir: Path, images: list[bytes], texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """What open_clip computes on the folder, by hand."""
    import open_clip
    import torch

    name = f"local-dir:{model_dir}"
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    model.eval()
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(io.BytesIO(b))) for b in images])
        image_features = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
        text_features = torch.nn.functional.normalize(model.encode_text(open_clip.get_tokenizer(name)(texts)), dim=-1)
    return image_features.numpy(), text_features.numpy()


def register(value: float | None, *, name: str = MODEL, source: str = "models/any", metric: str = f"eval/{METRIC}"):
    """A version of ``name`` whose metric is ``value`` (no metric at all when None)."""
    metrics = {} if value is None else {metric: value}
    return register_version(source, name, tags={"recipe_hash": "abc"}, metrics=metrics, run_id=None)


def aliases(name: str = MODEL) -> dict[str, str]:
    # the SQLite store hands versions back as int, a tracking server as str
    return {alias: str(v) for alias, v in MlflowClient().get_registered_model(name).aliases.items()}


def tags(version: str, name: str = MODEL) -> dict[str, str]:
    return MlflowClient().get_model_version(name, version).tags


# -- tracking ---------------------------------------------------------------------------------


def test_metric_key_maps_only_the_at_sign():
    assert metric_key("eval/retrieval/image_retrieval_recall@5") == "eval/retrieval/image_retrieval_recall_at_5"
    assert metric_key("train/loss") == "train/loss"
    assert metric_key("curate/near-duplicates/dropped") == "curate/near-duplicates/dropped"


def test_default_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert default_tracking_uri("sub") == f"sqlite:///{tmp_path.resolve()}/sub/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert default_tracking_uri(tmp_path) == "http://mlflow.example:5000"


def test_mlflow_ui_command():
    assert mlflow_ui_command("sqlite:////data/run/mlflow.db") == "mlflow ui --backend-store-uri sqlite:////data/run/mlflow.db"
    assert mlflow_ui_command("sqlite:////my runs/mlflow.db") == "mlflow ui --backend-store-uri 'sqlite:////my runs/mlflow.db'"
    assert "open http://127.0.0.1:5000" in mlflow_ui_command("http://127.0.0.1:5000")


def test_ensure_experiment_keeps_artifacts_beside_the_store(store, tmp_path):
    root = str(tmp_path / "mlartifacts")
    experiment_id = ensure_experiment("shapes", artifact_root=root)
    assert ensure_experiment("shapes", artifact_root="/elsewhere") == experiment_id
    location = MlflowClient().get_experiment(experiment_id).artifact_location
    assert location == (tmp_path / "mlartifacts" / "shapes").resolve().as_uri()
    MlflowClient().delete_experiment(experiment_id)
    assert ensure_experiment("shapes") == experiment_id  # restored, not refused


def test_log_metrics_batches_and_maps_names(store, tmp_path):
    experiment_id = ensure_experiment("metrics", artifact_root=str(tmp_path / "mlartifacts"))
    many = {f"eval/bench/recall@{i}": i / 10 for i in range(2500)}  # three batches
    with mlflow.start_run(experiment_id=experiment_id) as run:
        log_metrics(many, step=3)
        log_metrics({"train/loss": 1.5}, run_id=run.info.run_id)
    logged = MlflowClient().get_run(run.info.run_id).data.metrics
    assert len(logged) == 2501
    assert logged["eval/bench/recall_at_7"] == pytest.approx(0.7)
    assert logged["train/loss"] == 1.5
    history = MlflowClient().get_metric_history(run.info.run_id, "eval/bench/recall_at_1")
    assert [m.step for m in history] == [3]
    with pytest.raises(RuntimeError, match="no active MLflow run"):
        log_metrics({"x": 1.0})


# -- the pyfunc -------------------------------------------------------------------------------


@pytest.fixture
def logged_model(store, tmp_path, model_dir):
    experiment_id = ensure_experiment("shapes", artifact_root=str(tmp_path / "mlartifacts"))
    card = tmp_path / "MODEL_CARD.md"
    card.write_text("# card\n")
    with mlflow.start_run(experiment_id=experiment_id) as run:
        info = log_pyfunc_model(model_dir, input_example_image=png(99), extra_artifacts={"model_card": str(card)})
    return info, run.info.run_id


def test_pyfunc_round_trip_matches_open_clip(logged_model, model_dir):
    info, _ = logged_model
    assert info.model_uri.startswith("models:/m-")  # MLflow 3: a logged model, not a run artifact
    images, texts = [png(0), png(1), png(2)], ["a red circle", "two blue squares"]
    want_images, want_texts = reference_embeddings(model_dir, images, texts)

    model = mlflow.pyfunc.load_model(info.model_uri)
    signature = model.metadata.signature
    # the columns are the model's to check (so that a misnamed one is named back): no input schema,
    # an input example with both
    assert signature.inputs is None
    assert list(model.input_example.columns) == ["image", "text"]
    output = signature.outputs.inputs[0]
    assert (output.type, output.shape) == (np.dtype("float32"), (-1, 64))
    b64 = base64.b64encode(images[1]).decode()
    frame = pd.DataFrame(
        {
            "image": [images[0], None, b64, None, f"data:image/png;base64,{base64.b64encode(images[2]).decode()}"],
            "text": [None, texts[0], None, texts[1], None],
        }
    )
    out = model.predict(frame)
    assert out.dtype == np.float32 and out.shape == (5, 64)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(out[[0, 2, 4]], want_images, atol=1e-5)
    np.testing.assert_allclose(out[[1, 3]], want_texts, atol=1e-5)
    # a frame with only one of the two columns
    np.testing.assert_allclose(model.predict(pd.DataFrame({"text": texts})), want_texts, atol=1e-5)
    np.testing.assert_allclose(model.predict(pd.DataFrame({"image": [b64]})), want_images[[1]], atol=1e-5)


def test_pyfunc_refuses_ambiguous_and_bad_rows(logged_model):
    model = mlflow.pyfunc.load_model(logged_model[0].model_uri)
    with pytest.raises(ValueError, match="row 1 has neither"):
        model.predict(pd.DataFrame({"image": [png(0), None], "text": [None, None]}))
    with pytest.raises(ValueError, match="row 0 has both"):
        model.predict(pd.DataFrame({"image": [png(0)], "text": ["a cat"]}))
    with pytest.raises(ValueError, match="row 0: cannot decode the image"):
        model.predict(pd.DataFrame({"image": [b"not an image"]}))


def test_logged_model_carries_folder_artifacts_and_requirements(logged_model):
    info, _ = logged_model
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    folder = local / "artifacts"
    assert {p.name for p in folder.rglob("*") if p.is_file()} >= {
        "open_clip_config.json",
        "open_clip_model.safetensors",
        "MODEL_CARD.md",
    }
    assert not list(local.rglob("*.pkl"))  # models from code: nothing to unpickle
    requirements = (local / "requirements.txt").read_text()
    for package in ("mlflow==", "torch==", "open_clip_torch==", "pillow==", "pandas==", "numpy=="):
        assert package in requirements
    assert "clipforge" not in requirements


def test_registered_champion_loads_by_alias(logged_model, model_dir):
    info, run_id = logged_model
    version = register_version(info.model_uri, MODEL, tags={"recipe_hash": "abc"}, metrics={METRIC: 0.5}, run_id=run_id)
    assert version.run_id == run_id and version.status == "READY"
    assert promote_if_better(MODEL, version.version, metric=METRIC) == (True, None)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    _, want = reference_embeddings(model_dir, [png(0)], ["a cat"])
    np.testing.assert_allclose(model.predict(pd.DataFrame({"text": ["a cat"]})), want, atol=1e-5)


@pytest.mark.slow
def test_pyfunc_loads_without_clipforge(logged_model, tmp_path):
    """A fresh interpreter where `import clipforge` fails still loads and runs the model."""
    local = mlflow.artifacts.download_artifacts(logged_model[0].model_uri, dst_path=str(tmp_path / "copy"))
    script = textwrap.dedent(
        f"""
        import sys
        class NoClipforge:
            def find_spec(self, name, path=None, target=None):
                if name == "clipforge" or name.startswith("clipforge."):
                    raise ImportError("clipforge is not installed here")
        sys.meta_path.insert(0, NoClipforge())
        import mlflow, pandas as pd
        out = mlflow.pyfunc.load_model({local!r}).predict(pd.DataFrame({{"text": ["a cat", "a dog"]}}))
        assert "clipforge" not in sys.modules
        print(out.shape, out.dtype)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(2, 64) float32" in done.stdout


# -- registry and promotion -------------------------------------------------------------------


def test_challenger_on_newest_champion_only_on_better(store):
    v1 = register(0.5)
    assert (str(v1.version), v1.tags["metric.eval/retrieval/mean_recall_at_1"]) == ("1", "0.5")
    assert v1.tags["recipe_hash"] == "abc" and v1.aliases == ["challenger"]
    assert champion_metrics(MODEL) is None
    assert promote_if_better(MODEL, "1", metric=METRIC) == (True, None)
    assert tags("1")["promotion_reason"].startswith("first champion")
    assert tags("1")["promoted_by"].startswith("auto:")

    register(0.4)
    assert promote_if_better(MODEL, "2", metric=METRIC) == (False, "1")
    assert aliases() == {"champion": "1", "challenger": "2"}
    assert tags("2")["promotion_reason"].startswith("not promoted")

    register(0.6)
    assert promote_if_better(MODEL, "3", metric=f"eval/{METRIC}") == (True, "1")
    assert aliases() == {"champion": "3", "challenger": "3"}
    assert tags("3")["previous_champion"] == "1"
    assert champion_metrics(MODEL) == {"eval/retrieval/mean_recall_at_1": 0.6}


def test_min_delta_and_ties(store):
    register(0.5)
    promote_if_better(MODEL, "1", metric=METRIC)
    register(0.5)
    assert promote_if_better(MODEL, "2", metric=METRIC) == (False, "1")  # a tie is not better
    register(0.505)
    assert promote_if_better(MODEL, "3", metric=METRIC, min_delta=0.01) == (False, "1")
    register(0.52)
    assert promote_if_better(MODEL, "4", metric=METRIC, min_delta=0.01) == (True, "1")
    assert aliases()["champion"] == "4"


def test_mode_min_prefers_lower(store):
    for value in (1.0, 1.2, 0.8):
        register(value, metric="eval/loss")
    assert promote_if_better(MODEL, "1", metric="loss", mode="min") == (True, None)
    assert promote_if_better(MODEL, "2", metric="loss", mode="min") == (False, "1")
    assert promote_if_better(MODEL, "3", metric="loss", mode="min") == (True, "1")
    with pytest.raises(PromotionError, match="'max' or 'min'"):
        promote_if_better(MODEL, "3", metric="loss", mode="best")


def test_missing_or_nan_metric_never_takes_champion(store):
    register(None)
    with pytest.raises(PromotionError, match="has no metric 'retrieval/mean_recall@1'; it has: none"):
        promote_if_better(MODEL, "1", metric=METRIC)
    register(float("nan"))
    assert promote_if_better(MODEL, "2", metric=METRIC) == (False, None)
    assert "champion" not in aliases()
    register(0.3)
    promote_if_better(MODEL, "3", metric=METRIC)
    register(0.9, metric="eval/other")
    with pytest.raises(PromotionError, match="it has: eval/other"):
        promote_if_better(MODEL, "4", metric=METRIC)
    assert aliases()["champion"] == "3"


def test_set_champion_and_rollback(store):
    for value in (0.5, 0.6, 0.2):
        register(value)
    with pytest.raises(PromotionError, match="no champion to roll back"):
        rollback(MODEL)
    promote_if_better(MODEL, "1", metric=METRIC)
    promote_if_better(MODEL, "2", metric=METRIC)

    assert set_champion(MODEL, "3", reason="hotfix for captions", user="alice") == "2"
    assert aliases()["champion"] == "3"
    assert (tags("3")["promoted_by"], tags("3")["promotion_reason"]) == ("alice", "hotfix for captions")
    assert set_champion(MODEL, "3", reason="again", user="alice") == "3"  # already champion: no change
    assert tags("3")["previous_champion"] == "2"

    assert rollback(MODEL, reason="v3 regressed", user="bob") == "2"
    assert aliases()["champion"] == "2"
    assert tags("2")["promotion_reason"] == "v3 regressed (from v3)"
    assert tags("3")["rolled_back"] == "v3 regressed"
    assert rollback(MODEL) == "1"
    with pytest.raises(PromotionError, match="no previous champion"):
        rollback(MODEL)
    with pytest.raises(PromotionError, match="no version '9'"):
        set_champion(MODEL, "9", reason="typo")


def at_once(fn, args: list) -> None:
    """``fn(arg)`` for every arg, each in its thread, all released together; their errors are raised here."""
    start = threading.Barrier(len(args))
    errors: list[BaseException] = []

    def run(arg) -> None:
        try:
            start.wait()
            fn(arg)
        except BaseException as e:  # surfaced below: a thread's exception is otherwise lost
            errors.append(e)

    threads = [threading.Thread(target=run, args=(a,)) for a in args]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


def test_concurrent_promotions_from_threads_end_on_the_best(store):
    values = [random.Random(seed).random() for seed in range(8)]
    at_once(lambda value: promote_if_better(MODEL, register(value).version, metric=METRIC), values)
    assert champion_metrics(MODEL) == {"eval/retrieval/mean_recall_at_1": max(values)}
    assert aliases()["challenger"] == str(len(values))


def test_concurrent_promotions_without_a_shared_lock_end_on_the_best(store, monkeypatch):
    """Promoters on different machines share no lock: the generation tag and the settle re-read decide."""
    import contextlib

    from clipforge.registry import promotion

    monkeypatch.setattr(promotion, "_registry_lock", lambda name: contextlib.nullcontext())
    monkeypatch.setattr(promotion, "_settle_s", lambda: 1.0)
    slow = random.Random(0)
    get_version = MlflowClient.get_model_version

    def slow_read(self, name, version):  # a slow network between reading the champion and deciding
        time.sleep(slow.uniform(0, 0.1))
        return get_version(self, name, version)

    monkeypatch.setattr(MlflowClient, "get_model_version", slow_read)
    values = [random.Random(seed).random() for seed in range(10, 16)]
    versions = [register(v).version for v in values]
    at_once(lambda version: promote_if_better(MODEL, version, metric=METRIC), versions)
    assert champion_metrics(MODEL) == {"eval/retrieval/mean_recall_at_1": max(values)}


@pytest.mark.slow
def test_concurrent_promotions_from_processes_end_on_the_best(store, tmp_path):
    values = [0.31, 0.77, 0.52, 0.64]
    ready = tmp_path / "ready"
    ready.mkdir()
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from clipforge.registry import promote_if_better, register_version
        value, ready, n = float(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
        (ready / sys.argv[1]).touch()
        while len(list(ready.iterdir())) < n:  # start together, once every process has imported
            time.sleep(0.01)
        v = register_version("models/any", {MODEL!r}, tags={{}}, metrics={{{METRIC!r}: value}}, run_id=None)
        print(promote_if_better({MODEL!r}, v.version, metric={METRIC!r}))
        """
    )
    args = [str(ready), str(len(values))]
    procs = [subprocess.Popen([sys.executable, "-c", script, str(v), *args], stderr=subprocess.PIPE, text=True) for v in values]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    assert champion_metrics(MODEL) == {"retrieval/mean_recall_at_1": max(values)}
    assert aliases()["challenger"] == str(len(values))


# -- guards, same-data metrics, first versions -----------------------------------------------

OLD = "eval/old/retrieval/mean_recall@1"


def register_both(new: float, old: float):
    metrics = {f"eval/{METRIC}": new, OLD: old}
    return register_version("models/any", MODEL, tags={}, metrics=metrics, run_id=None)


def test_a_guard_refuses_a_challenger_that_forgets(store):
    register_both(0.5, 0.8)
    assert promote_if_better(MODEL, "1", metric=METRIC, guards=[(OLD, 0.05)]) == (True, None)
    register_both(0.7, 0.74)  # better on the new data, 0.06 worse on the old: over the budget
    assert promote_if_better(MODEL, "2", metric=METRIC, guards=[(OLD, 0.05)]) == (False, "1")
    assert tags("2")["promotion_reason"].startswith("not promoted: guard eval/old/retrieval/mean_recall@1 dropped by 0.06")
    assert tags("2")["promotion_guard"].startswith("eval/old/retrieval/mean_recall@1 dropped by 0.06 (0.8 -> 0.74)")
    register_both(0.7, 0.76)  # within the budget
    assert promote_if_better(MODEL, "3", metric=METRIC, guards=[(OLD, 0.05)]) == (True, "1")
    assert "every guard within its budget (1)" in tags("3")["promotion_reason"]
    assert "promotion_guard" not in tags("3")
    register_both(0.9, 0.9)
    with pytest.raises(PromotionError, match="has no metric 'eval/gone/x'"):
        promote_if_better(MODEL, "4", metric=METRIC, guards=[("eval/gone/x", 0.1)])


@settings(max_examples=300, deadline=None)
@given(
    ours=st.floats(0, 1), theirs=st.floats(0, 1), min_delta=st.floats(0, 0.2),
    guarded=st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 0.3)), max_size=4),
    mode=st.sampled_from(["max", "min"]),
)  # fmt: skip
def test_the_verdict_is_the_rule_and_every_guard(ours, theirs, min_delta, guarded, mode):
    """Promoted exactly when the metric wins by more than min_delta and no guard drops by more than its
    budget; a guard on a lower-is-better metric (alignment) counts a rise as the drop."""
    from clipforge.registry.promotion import _verdict

    names = [f"eval/set{i}/" + ("geometry/alignment" if i % 2 else "retrieval/m") for i in range(len(guarded))]
    candidate = {"eval/new/retrieval/m": ours} | {n: g[0] for n, g in zip(names, guarded)}
    incumbent = {"eval/new/retrieval/m": theirs} | {n: g[1] for n, g in zip(names, guarded)}
    guards = [(n, g[2]) for n, g in zip(names, guarded)]
    judged = _verdict("eval/new/retrieval/m", candidate, "1", incumbent, mode, min_delta, guards)
    better, reason = judged.better, judged.reason
    wins = (ours - theirs if mode == "max" else theirs - ours) > min_delta
    drops = [(c - i if n.endswith("alignment") else i - c) for n, (c, i, _) in zip(names, guarded)]
    kept = all(d <= budget for d, (_, _, budget) in zip(drops, guarded))
    assert better == (wins and kept), reason
    assert reason.startswith("not promoted") != better


def test_promotion_decides_on_the_metrics_it_is_given(store):
    """The register flow passes each version's metrics on its own evaluation data: they, not the tags, decide."""
    register(0.9)
    promote_if_better(MODEL, "1", metric=METRIC)
    register(0.5)  # worse by its tags, but the champion measured again on today's data is worse still
    today = {"1": {f"eval/{METRIC}": 0.3}, "2": {f"eval/{METRIC}": 0.5}}
    assert promote_if_better(MODEL, "2", metric=METRIC, metrics_of=today.__getitem__) == (True, "1")
    assert "champion v1 (retrieval/mean_recall@1=0.3)" in tags("2")["promotion_reason"]


@pytest.mark.parametrize("shared_lock", [True, False])
@pytest.mark.parametrize("n", [2, 6])
def test_first_versions_registered_at_once_leave_one_champion(store, monkeypatch, shared_lock, n):
    """Without a promotion rule, first retrains that overlap end with exactly one champion: the first registered."""
    import contextlib

    from clipforge.registry import promote_first_version, promotion

    if not shared_lock:
        monkeypatch.setattr(promotion, "_registry_lock", lambda name: contextlib.nullcontext())
        monkeypatch.setattr(promotion, "_settle_s", lambda: 0.5)
    versions = [register(None).version for _ in range(n)]
    outcomes: dict[str, bool] = {}
    at_once(lambda v: outcomes.__setitem__(str(v), promote_first_version(MODEL, v)[0]), versions)
    assert aliases()["champion"] == "1"
    assert tags("1")["promotion_reason"].startswith("first version")
    later = [str(v) for v in versions[1:]]
    assert all(tags(v)["promotion_reason"].startswith("the recipe has no registry.promote rule") for v in later
               if not outcomes[v])  # fmt: skip
    register(None)
    assert promote_first_version(MODEL, str(n + 1)) == (False, "1")


# -- the model card ---------------------------------------------------------------------------


def test_model_card():
    recipe = textwrap.dedent(
        """
        name: shapes
        data:
          train: {type: synthetic-shapes, size: 4000, seed: 0}
          eval: {type: synthetic-shapes, size: 500, seed: 1}
        curation:
          - {type: caption-length, min_words: 2}
        registry: {model_name: shapes-clip}
        """
    )
    card = render_model_card(
        model_name="shapes-clip",
        recipe_yaml=recipe,
        metrics={"eval/retrieval/mean_recall@1": 0.8125, "train/loss": 1.25, "eval/x|y": math.nan},
        lineage={"recipe_hash": "abc123", "data_manifest": "s3://bucket/manifest.json"},
        version="7",
    )
    assert card.startswith("# shapes-clip — version 7\n")
    for section in ("## Data", "## Metrics", "## Lineage", "## Recipe", "## How to use it"):
        assert section in card
    assert "| train | `synthetic-shapes` (size=4000, seed=0) |" in card
    assert "`caption-length` (min_words=2)" in card
    assert "| eval/retrieval/mean_recall@1 | 0.8125 |" in card
    assert "| eval/x\\|y | nan |" in card
    assert "| recipe_hash | abc123 |" in card
    assert recipe.strip() in card
    assert 'open_clip.create_model_and_transforms("local-dir:PATH")' in card
    assert 'mlflow.pyfunc.load_model("models:/shapes-clip@champion")' in card
    assert "models:/shapes-clip/7" in card
    unregistered = render_model_card(model_name="m", recipe_yaml=": not yaml [", metrics={}, lineage={}, version=None)
    assert unregistered.startswith("# m\n") and "None recorded." in unregistered
