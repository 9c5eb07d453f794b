"""The clip-benchmark dataset reads what CLIP_benchmark's converter writes, local and on S3, and our
evaluators give CLIP_benchmark's own numbers on it, to 1e-6; every bad input names its file."""

from __future__ import annotations

import io
import shutil
import tarfile

import pytest
import torch

import clipforge
from clipforge.core.plugins import PluginManager
from clipforge.core.validation import load_recipe
from clipforge.engine.evaluation import evaluate
from clipforge.testing import check_dataset
from tests.clip_benchmark_folders import MULTI, NAMES, TEMPLATES, export_tiny_model, write_task
from tests.conftest import TINY_RECIPE


@pytest.fixture(scope="module")
def catalog():
    return PluginManager(load_entry_points=False).catalog


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cb")
    return {
        "model": export_tiny_model(root / "model"),
        # several shards each, of unequal sizes
        "classification": write_task(root / "tasks" / "digits", "classification", 90, seed=1, max_count=40),
        "multilabel": write_task(root / "tasks" / "digits-multi", "multilabel", 60, seed=2, max_count=25),
        "retrieval": write_task(root / "tasks" / "digits-captions", "retrieval", 50, seed=3, max_count=20),
    }


def theirs(folders, kind: str, batch_size: int = 16) -> dict[str, float]:
    """What `clip_benchmark eval` computes on the folder with the exported model (its own loader and metrics)."""
    import open_clip
    from clip_benchmark.datasets.builder import build_wds_dataset, image_captions_collate_fn
    from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folders['model']}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folders['model']}")
    dataset = build_wds_dataset("wds/x", transform=preprocess, split="test", data_dir=str(folders[kind]))
    if kind == "retrieval":
        loader = torch.utils.data.DataLoader(dataset.batched(batch_size), batch_size=None, collate_fn=None)
        # clip_benchmark's cli: batches of (images, [captions per image])
        batches = [(images, list(captions)) for images, captions in (image_captions_collate_fn(list(zip(*b))) for b in loader)]
        return zeroshot_retrieval.evaluate(model, batches, tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
    loader = torch.utils.data.DataLoader(dataset.batched(batch_size), batch_size=None)

    class Loader(list):
        pass

    batches = Loader(loader)
    batches.dataset = dataset  # clip_benchmark reads the class names from the loader's dataset
    return zeroshot_classification.evaluate(model, batches, tokenizer, dataset.classes, dataset.templates, "cpu", amp=False)


def ours(folders, kind: str, evaluator: dict, **dataset) -> dict[str, float]:
    recipe = load_recipe(
        {
            **TINY_RECIPE,
            "data": {
                "train": TINY_RECIPE["data"]["train"],
                "eval": {"type": "clip-benchmark", "root": str(folders[kind]), **dataset},
            },
            "evaluation": [evaluator],
            "registry": {},
        }
    )
    return evaluate(recipe, PluginManager(load_entry_points=False).catalog, str(folders["model"]), device="cpu").metrics


def test_classification_equals_clip_benchmark(folders):
    expected = theirs(folders, "classification")
    got = ours(folders, "classification", {"type": "zero-shot-classification", "batch_size": 7})
    for name in ("acc1", "acc5", "mean_per_class_recall"):
        assert got[f"eval/zero-shot-classification/{name}"] == pytest.approx(expected[name], abs=1e-6), name


def test_multilabel_map_equals_clip_benchmark(folders):
    expected = theirs(folders, "multilabel")
    got = ours(folders, "multilabel", {"type": "zero-shot-classification"})
    assert got["eval/zero-shot-classification/mean_average_precision"] == pytest.approx(
        expected["mean_average_precision"], abs=1e-6
    )


def test_retrieval_equals_clip_benchmark(folders):
    expected = theirs(folders, "retrieval")
    got = ours(folders, "retrieval", {"type": "retrieval", "ks": [1, 5, 10], "batch_size": 9})
    for k in (1, 5, 10):
        for way in ("image", "text"):
            name = f"{way}_retrieval_recall@{k}"
            assert got[f"eval/retrieval/{name}"] == pytest.approx(expected[name], abs=1e-6), name


def test_the_folder_gives_classes_templates_and_every_sample(folders, catalog):
    data = catalog.create("datasets", {"type": "clip-benchmark", "root": str(folders["classification"])})
    assert data.classes == NAMES and data.templates == TEMPLATES and data.dataset_type == "classification"
    samples = list(data)
    assert len(samples) == 90 and len({s.key for s in samples}) == 90
    assert all(s.caption == NAMES[s.label] for s in samples)
    assert [s.key for s in data] == [s.key for s in samples]  # re-iterable, same order
    multi = catalog.create("datasets", {"type": "clip-benchmark", "root": str(folders["multilabel"])})
    assert multi.classes == MULTI and multi.multilabel
    assert all(len(s.meta["targets"]) == len(MULTI) and sum(s.meta["targets"]) >= 1 for s in multi)
    retrieval = catalog.create("datasets", {"type": "clip-benchmark", "root": str(folders["retrieval"])})
    assert retrieval.classes is None and all(len(s.caption) == len(TEMPLATES) for s in retrieval)
    for dataset in (data, multi, retrieval):
        check_dataset(dataset)


def test_the_recipe_overrides_classes_and_templates(folders, catalog):
    renamed = [f"digit {n}" for n in NAMES]
    data = catalog.create(
        "datasets", {"type": "clip-benchmark", "root": str(folders["classification"]), "classes": renamed, "templates": ["{c}"]}
    )
    assert data.classes == renamed and data.templates == ["{c}"]
    with pytest.raises(clipforge.ConfigError, match="templates"):
        catalog.create("datasets", {"type": "clip-benchmark", "root": str(folders["classification"]), "templates": ["no class"]})


# -- bad input: one clear error naming the file ---------------------------------------------


def copy_task(folders, tmp_path, kind="classification"):
    return shutil.copytree(folders[kind], tmp_path / "task")


def test_a_folder_without_nshards_is_refused_naming_the_file(folders, tmp_path, catalog):
    task = copy_task(folders, tmp_path)
    (task / "test" / "nshards.txt").unlink()
    with pytest.raises(clipforge.ConfigError, match=r"test/nshards.txt is missing"):
        catalog.create("datasets", {"type": "clip-benchmark", "root": str(task)})


def test_a_template_without_c_is_refused_naming_the_file_and_line(folders, tmp_path, catalog):
    task = copy_task(folders, tmp_path)
    (task / "zeroshot_classification_templates.txt").write_text("a photo of {c}.\na photo.\n")
    with pytest.raises(clipforge.ConfigError, match=r"zeroshot_classification_templates.txt line 2: .*\{c\}"):
        catalog.create("datasets", {"type": "clip-benchmark", "root": str(task)})


def test_a_label_outside_the_classes_is_refused_naming_the_shard_and_key(folders, tmp_path, catalog):
    task = copy_task(folders, tmp_path)
    (task / "classnames.txt").write_text("\n".join(NAMES[:3]) + "\n")
    data = catalog.create("datasets", {"type": "clip-benchmark", "root": str(task)})
    with pytest.raises(
        clipforge.ConfigError, match=r"test/0.tar: s\d+.cls is class \d, outside the 3 classes of .*classnames.txt"
    ):
        list(data)


def _rewrite(shard, change):
    """Rewrite a tar shard, each member passed through ``change(name, data) -> data``."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            data = change(m.name, data)
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))


def test_an_image_that_does_not_decode_is_skipped_counted_and_named(folders, tmp_path):
    task = copy_task(folders, tmp_path)
    broken = []

    def corrupt(name, data):
        if name.endswith(".png") and len(broken) < 2:
            broken.append(name.split(".")[0])
            return data[:20]
        return data

    _rewrite(task / "test" / "1.tar", corrupt)
    recipe = load_recipe(
        {
            **TINY_RECIPE,
            "data": {"train": TINY_RECIPE["data"]["train"], "eval": {"type": "clip-benchmark", "root": str(task)}},
            "evaluation": [{"type": "zero-shot-classification"}],
            "registry": {},
        }
    )
    evaluation = evaluate(recipe, PluginManager(load_entry_points=False).catalog, str(folders["model"]), device="cpu")
    assert evaluation.metrics["eval/clip-benchmark/skipped"] == 2
    assert sorted(evaluation.skipped["clip-benchmark"]) == sorted(broken)
    assert all("does not decode" in why for why in evaluation.skipped["clip-benchmark"].values())
    assert len(evaluation.per_sample["eval/zero-shot-classification/acc1"].keys) == 88


@pytest.mark.slow
def test_the_three_layouts_on_s3_give_the_local_numbers(folders, tmp_path, monkeypatch):
    import s3fs

    from tests.services import ACCESS_KEY, SECRET_KEY, create_bucket, moto_s3

    with moto_s3(tmp_path) as endpoint:
        create_bucket(endpoint, "bench")
        for name, value in (
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
            ("AWS_DEFAULT_REGION", "us-east-1"),
        ):
            monkeypatch.setenv(name, value)
        fs = s3fs.S3FileSystem(endpoint_url=endpoint)
        for kind in ("classification", "multilabel", "retrieval"):
            fs.put(str(folders[kind]), f"bench/{kind}", recursive=True)
        remote = {kind: f"s3://bench/{kind}" for kind in ("classification", "multilabel", "retrieval")} | {
            "model": folders["model"]
        }
        options = {"storage_options": {"endpoint_url": endpoint}}
        for kind, evaluator in (
            ("classification", {"type": "zero-shot-classification"}),
            ("multilabel", {"type": "zero-shot-classification"}),
            ("retrieval", {"type": "retrieval"}),
        ):
            assert ours(remote, kind, evaluator, **options) == pytest.approx(ours(folders, kind, evaluator), abs=1e-9), kind


def test_image_caption_selection_equals_clip_benchmark(folders):
    """SugarCrepe's test on a folder of captions (the first true, the others false), as CLIP_benchmark scores it."""
    import open_clip
    from clip_benchmark.datasets.builder import build_wds_dataset, image_captions_collate_fn
    from clip_benchmark.metrics import image_caption_selection

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folders['model']}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folders['model']}")
    dataset = build_wds_dataset("wds/x", transform=preprocess, split="test", data_dir=str(folders["retrieval"]))
    loader = torch.utils.data.DataLoader(dataset.batched(8), batch_size=None)
    batches = [image_captions_collate_fn(list(zip(*b))) for b in loader]
    expected = image_caption_selection.evaluate(model.eval(), batches, tokenizer, "cpu", amp=False)
    got = ours(folders, "retrieval", {"type": "image-caption-selection", "batch_size": 5})
    assert got["eval/image-caption-selection/acc"] == pytest.approx(expected["text_acc"], abs=1e-6)
    assert 0 < expected["text_acc"] < 1  # the test can tell a right answer from a wrong one


def test_image_caption_selection_scores_each_category(catalog):
    from clipforge import Sample
    from clipforge.plugins.evaluators.caption_selection import ImageCaptionSelection
    from tests.test_evaluators import onehot, picture, table_bundle

    texts = {"t0": onehot(0, 3), "f0": onehot(1, 3), "t1": onehot(2, 3), "f1": onehot(1, 3)}
    bundle = table_bundle([onehot(0, 3), onehot(1, 3)], texts)
    samples = [
        Sample("a", picture(0), ["t0", "f0"], meta={"category": "swap-obj"}),  # true caption closer: right
        Sample("b", picture(1), ["t1", "f1"], meta={"category": "replace-att"}),  # false caption closer: wrong
    ]
    evaluator = ImageCaptionSelection()
    metrics = evaluator.evaluate(bundle, samples, "cpu")
    assert metrics == {"acc": 0.5, "swap-obj/acc": 1.0, "replace-att/acc": 0.0}
    assert evaluator.per_sample["acc"].values == [1.0, 0.0]
    with pytest.raises(clipforge.ConfigError, match="the true one first and at least one false one"):
        evaluator.evaluate(bundle, [Sample("c", picture(0), "t0")], "cpu")


def test_the_data_hash_follows_the_folders_bytes_and_the_classes_used(folders, tmp_path, catalog):
    task = copy_task(folders, tmp_path)
    entry = {"type": "clip-benchmark", "root": str(task)}
    first = catalog.create("datasets", entry).content_digest()
    assert catalog.create("datasets", entry).content_digest() == first
    assert catalog.create("datasets", {**entry, "classes": [f"digit {n}" for n in NAMES]}).content_digest() != first

    def touch(name, data):
        return data + b"\0" if name.endswith(".cls") and name.startswith("s0000001") else data

    _rewrite(task / "test" / "0.tar", touch)
    assert catalog.create("datasets", entry).content_digest() != first
