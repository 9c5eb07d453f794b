"""The built-in evaluators: exact metrics on models whose embeddings the tests choose, a tiny
open_clip model end to end through the catalog, and every bad input."""

from __future__ import annotations

import io
import math
import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import clipforge
from clipforge import EncoderBundle, Sample
from clipforge.core.embeddings import embed_images
from clipforge.core.plugins import PluginManager
from clipforge.plugins.evaluators import retrieval as retrieval_module
from clipforge.plugins.evaluators.retrieval import Retrieval
from clipforge.plugins.evaluators.zero_shot import ZeroShotClassification

TINY_CLIP = {
    "type": "open-clip",
    "config": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 32, "width": 64, "heads": 2, "layers": 2},
    },
}


# -- a model whose embeddings the test chooses ----------------------------------------------
# Image i is a tiny picture whose red value is i; the "model" looks its embedding up in a table.
# Texts are looked up by exact string, so a prompt the evaluator should not build fails loudly.


class TableModel(torch.nn.Module):
    def __init__(self, image_vecs, text_vecs):
        super().__init__()
        self.register_buffer("images", torch.tensor(image_vecs, dtype=torch.float32))
        self.register_buffer("texts", torch.tensor(text_vecs, dtype=torch.float32))
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(100.0)))

    def encode_image(self, x):
        return self.images[x.long()]

    def encode_text(self, tokens):
        return self.texts[tokens]


def table_bundle(image_vecs, text_vecs: dict[str, list[float]]) -> EncoderBundle:
    vocab = {t: i for i, t in enumerate(text_vecs)}
    return EncoderBundle(
        model=TableModel(image_vecs, list(text_vecs.values())),
        tokenizer=lambda texts: torch.tensor([vocab[t] for t in texts]),
        preprocess_train=None,
        preprocess_val=lambda im: torch.tensor(im.getpixel((0, 0))[0]),
        arch="table",
    )


def picture(i: int, encoded: bool = False):
    image = Image.new("RGB", (2, 2), (i, 0, 0))
    if not encoded:
        return image
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class Labelled(list):
    """A classification dataset: a list of samples with ``classes`` (and maybe ``templates``)."""

    def __init__(self, samples, classes, templates=None):
        super().__init__(samples)
        self.classes = classes
        if templates is not None:
            self.templates = templates


def unit(*v):
    return F.normalize(torch.tensor(v, dtype=torch.float32), dim=0).tolist()


def onehot(i, n):
    return [float(i == j) for j in range(n)]


def pairs(captions):
    """A retrieval dataset: sample i is picture i with ``captions[i]``; odd ones as PNG bytes."""
    return [Sample(f"s{i}", picture(i, encoded=i % 2 == 1), c) for i, c in enumerate(captions)]


@pytest.fixture(scope="module")
def catalog():
    return PluginManager(load_entry_points=False).catalog


# -- retrieval: exact values ----------------------------------------------------------------


def test_retrieval_perfect_model_recalls_everything_also_for_k_past_the_dataset():
    texts = {f"t{i}": onehot(i, 4) for i in range(4)}
    bundle = table_bundle([onehot(i, 4) for i in range(4)], texts)
    metrics = Retrieval(ks=[1, 5, 10]).evaluate(bundle, pairs(list(texts)), "cpu")
    names = ("image_retrieval_recall", "text_retrieval_recall", "mean_recall")
    assert metrics == {f"{m}@{k}": 1.0 for k in (1, 5, 10) for m in names}
    assert all(type(v) is float for v in metrics.values())


def test_retrieval_swapped_pair_halves_recall_at_1():
    # the captions of images 0 and 1 embed where the other image is
    texts = {"t0": onehot(1, 4), "t1": onehot(0, 4), "t2": onehot(2, 4), "t3": onehot(3, 4)}
    bundle = table_bundle([onehot(i, 4) for i in range(4)], texts)
    metrics = Retrieval(ks=[1, 4]).evaluate(bundle, pairs(list(texts)), "cpu")
    assert metrics["image_retrieval_recall@1"] == 0.5
    assert metrics["text_retrieval_recall@1"] == 0.5
    assert metrics["mean_recall@1"] == 0.5
    assert metrics["mean_recall@4"] == 1.0


def test_retrieval_with_several_captions_counts_captions_for_image_recall_and_images_for_text_recall():
    images = [onehot(0, 3), onehot(1, 3), onehot(2, 3)]
    texts = {
        "a0": onehot(0, 3),  # image 0, right
        "a1": unit(0.3, 1, 0),  # image 0, closest to image 1 (0.96), then image 0 (0.29)
        "b0": unit(0, 0.5, 1),  # image 1, closest to image 2 (0.89), then image 1 (0.45)
        "c0": onehot(2, 3),  # image 2, right
    }
    bundle = table_bundle(images, texts)
    metrics = Retrieval(ks=[1, 2]).evaluate(bundle, pairs([["a0", "a1"], "b0", ["c0"]]), "cpu")
    # text -> image, over the 4 captions: a0 and c0 find their image first
    assert metrics["image_retrieval_recall@1"] == 2 / 4
    # image -> text, over the 3 images: image 0 finds a0, image 1 finds a1 (image 0's), image 2 finds c0
    assert metrics["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert metrics["mean_recall@1"] == pytest.approx((2 / 4 + 2 / 3) / 2)
    assert metrics["image_retrieval_recall@2"] == metrics["text_retrieval_recall@2"] == 1.0


def naive_retrieval(images, texts, owner, ks):
    """recall@k by the definitions, one query at a time."""
    scores = texts @ images.T
    out = {}
    for k in ks:
        t2i = [owner[t] in scores[t].argsort(descending=True)[:k].tolist() for t in range(len(texts))]
        i2t = [any(owner[t] == i for t in scores[:, i].argsort(descending=True)[:k].tolist()) for i in range(len(images))]
        out[f"image_retrieval_recall@{k}"] = sum(t2i) / len(t2i)
        out[f"text_retrieval_recall@{k}"] = sum(i2t) / len(i2t)
    return out


def random_pairs(seed, n_images=40, dim=8):
    """Noisy captions (1 to 3 per image) near their image, so recalls are neither 0 nor 1."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    images = F.normalize(torch.randn(n_images, dim, generator=gen), dim=-1)
    captions, texts, owner = [], {}, []
    for i in range(n_images):
        names = [f"img{i}-cap{j}" for j in range(rng.randint(1, 3))]
        for name in names:
            texts[name] = F.normalize(images[i] + 0.9 * torch.randn(dim, generator=gen), dim=0).tolist()
            owner.append(i)
        captions.append(names if len(names) > 1 or rng.random() < 0.5 else names[0])
    return images, texts, owner, captions


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_retrieval_matches_a_query_by_query_reference_also_when_chunked(seed, monkeypatch):
    images, texts, owner, captions = random_pairs(seed)
    ks = [1, 2, 3, 5, 60]
    expected = naive_retrieval(images, torch.tensor(list(texts.values())), owner, ks)
    bundle = table_bundle(images.tolist(), texts)
    whole = Retrieval(ks=ks, batch_size=7).evaluate(bundle, pairs(captions), "cpu")
    # a tiny block size makes every query chunk a few rows, with a ragged last one
    monkeypatch.setattr(retrieval_module, "SCORES_PER_CHUNK", 150)
    chunked = Retrieval(ks=ks, batch_size=7).evaluate(bundle, pairs(captions), "cpu")
    for name, value in expected.items():
        assert whole[name] == pytest.approx(value), name
        assert chunked[name] == pytest.approx(value), name
    assert 0 < whole["image_retrieval_recall@1"] < 1 and 0 < whole["text_retrieval_recall@1"] < 1


def test_retrieval_agrees_with_clip_benchmark():
    cb = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
    images, texts, owner, captions = random_pairs(3)
    text_emb = torch.tensor(list(texts.values()))
    scores = text_emb @ images.T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(owner)), owner] = True
    ours = Retrieval(ks=[1, 5, 10]).evaluate(table_bundle(images.tolist(), texts), pairs(captions), "cpu")
    for k in (1, 5, 10):
        theirs_image = (cb.batchify(cb.recall_at_k, scores, positive, 16, "cpu", k=k) > 0).float().mean().item()
        theirs_text = (cb.batchify(cb.recall_at_k, scores.T, positive.T, 16, "cpu", k=k) > 0).float().mean().item()
        assert ours[f"image_retrieval_recall@{k}"] == pytest.approx(theirs_image)
        assert ours[f"text_retrieval_recall@{k}"] == pytest.approx(theirs_text)


# -- zero-shot classification: exact values -------------------------------------------------


def test_zero_shot_perfect_model_and_no_acc5_below_five_classes():
    classes = ["cat", "dog", "bird"]
    bundle = table_bundle([onehot(i, 3) for i in range(3)], {f"a {c}": onehot(i, 3) for i, c in enumerate(classes)})
    data = Labelled([Sample(f"s{i}", picture(i), "", label=i) for i in range(3)], classes)
    metrics = ZeroShotClassification(templates=["a {c}"]).evaluate(bundle, data, "cpu")
    assert metrics == {"acc1": 1.0, "mean_per_class_recall": 1.0}
    assert all(type(v) is float for v in metrics.values())


def test_zero_shot_class_embedding_is_the_normalised_mean_of_normalised_prompt_embeddings():
    # "a cat" is 10x longer than "the cat": averaging raw embeddings would point the cat class
    # at x (0.10 similarity to the image, less than dog's 0.6); normalising first gives 0.71.
    texts = {"a cat": [10.0, 0, 0], "the cat": [0, 1.0, 0], "a dog": unit(0, 0.6, 0.8), "the dog": unit(0, 0.6, 0.8)}
    bundle = table_bundle([[0, 1.0, 0]], texts)
    data = Labelled([Sample("s0", picture(0), "", label=0)], ["cat", "dog"])
    assert ZeroShotClassification(templates=["a {c}", "the {c}"]).evaluate(bundle, data, "cpu")["acc1"] == 1.0


def test_zero_shot_acc5_with_six_classes():
    classes = [f"k{i}" for i in range(6)]
    images = [
        [0.1, 0.9, 0.8, 0.7, 0.6, 0.5],  # label 0, ranked 6th: misses top 5
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],  # label 1, ranked 2nd: top-5 hit only
        onehot(2, 6),  # label 2, ranked 1st
    ]
    bundle = table_bundle(images, {c: onehot(i, 6) for i, c in enumerate(classes)})
    data = Labelled([Sample(f"s{i}", picture(i), "", label=i) for i in range(3)], classes, templates=["{c}"])
    metrics = ZeroShotClassification().evaluate(bundle, data, "cpu")
    assert metrics["acc1"] == pytest.approx(1 / 3)
    assert metrics["acc5"] == pytest.approx(2 / 3)


def test_zero_shot_mean_per_class_recall_averages_only_the_classes_present():
    # four cats right, the one dog called a cat; no bird in the data
    classes = ["cat", "dog", "bird"]
    bundle = table_bundle([unit(1, 0.1, 0), unit(1, 0.5, 0)], {f"a {c}": onehot(i, 3) for i, c in enumerate(classes)})
    samples = [Sample(f"c{i}", picture(0), "", label=0) for i in range(4)] + [Sample("d", picture(1), "", label=1)]
    metrics = ZeroShotClassification(templates=["a {c}"]).evaluate(bundle, Labelled(samples, classes), "cpu")
    assert metrics["acc1"] == pytest.approx(0.8)
    assert metrics["mean_per_class_recall"] == pytest.approx(0.5)


def test_zero_shot_templates_come_from_params_then_the_dataset_then_the_default():
    samples = [Sample("s0", picture(0), "", label=0), Sample("s1", picture(1), "", label=1)]
    images = [onehot(0, 2), onehot(1, 2)]
    for prompt, params, dataset_templates in [
        ("{c} here", ["{c} here"], ["{c} there"]),
        ("{c} there", None, ["{c} there"]),
        ("a photo of a {c}.", None, None),
    ]:
        # the tokenizer knows only the prompts that should be built
        bundle = table_bundle(images, {prompt.format(c="x"): onehot(0, 2), prompt.format(c="y"): onehot(1, 2)})
        data = Labelled(samples, ["x", "y"], templates=dataset_templates)
        assert ZeroShotClassification(templates=params).evaluate(bundle, data, "cpu")["acc1"] == 1.0


def test_zero_shot_agrees_with_clip_benchmark():
    cb = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
    from sklearn.metrics import balanced_accuracy_score

    gen = torch.Generator().manual_seed(0)
    classes, templates = [f"k{i}" for i in range(7)], ["{c}", "a {c}", "the {c}"]
    texts = {t.format(c=c): torch.randn(16, generator=gen).tolist() for c in classes for t in templates}
    images = torch.randn(60, 16, generator=gen)
    labels = torch.randint(0, 7, (60,), generator=gen)
    bundle = table_bundle(images.tolist(), texts)
    data = Labelled([Sample(f"s{i}", picture(i), "", label=int(y)) for i, y in enumerate(labels)], classes)
    ours = ZeroShotClassification(templates=templates, batch_size=8).evaluate(bundle, data, "cpu")

    classifier = cb.zero_shot_classifier(bundle.model, bundle.tokenizer, classes, templates, "cpu", amp=False)
    loader = [(torch.arange(i, min(i + 8, 60)), labels[i : i + 8]) for i in range(0, 60, 8)]
    logits, target = cb.run_classification(bundle.model, classifier, loader, "cpu", amp=False)
    acc1, acc5 = cb.accuracy(logits, target, topk=(1, 5))
    assert ours["acc1"] == pytest.approx(acc1)
    assert ours["acc5"] == pytest.approx(acc5)
    assert ours["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(target, logits.argmax(dim=1)))


# -- the shared embedding helper ------------------------------------------------------------


def test_embed_images_normalises_decodes_bytes_and_restores_the_train_mode():
    bundle = table_bundle([[3.0, 4.0], [0, 2.0]], {"t": [1.0, 0]})
    bundle.model.train()
    data = [Sample("a", picture(0), "x", meta={"m": 1}), Sample("b", picture(1, encoded=True), "y")]
    emb, samples = embed_images(bundle, data, "cpu", batch_size=1)
    assert emb.dtype == torch.float32
    assert torch.allclose(emb, torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    assert [(s.key, s.image, s.caption, s.meta) for s in samples] == [("a", None, "x", {"m": 1}), ("b", None, "y", {})]
    assert bundle.model.training


# -- a real model through the catalog -------------------------------------------------------


def test_tiny_open_clip_end_to_end_through_the_catalog(catalog):
    bundle = catalog.create("encoders", TINY_CLIP)
    gen = torch.Generator().manual_seed(0)
    classes = ["circle", "square", "triangle", "star", "cross"]
    samples = []
    for i in range(12):
        pixels = (torch.rand(32, 32, 3, generator=gen) * 255).to(torch.uint8).numpy()
        image = Image.fromarray(pixels)
        if i % 2:
            buf = io.BytesIO()
            image.save(buf, format="JPEG")
            image = buf.getvalue()
        caption = f"a red {classes[i % 5]}" if i % 3 else [f"a {classes[i % 5]}", f"one {classes[i % 5]}"]
        samples.append(Sample(f"s{i}", image, caption, label=i % 5))
    data = Labelled(samples, classes)

    retrieval = catalog.create("evaluators", {"type": "retrieval", "ks": [1, 5]})
    zero_shot = catalog.create("evaluators", {"type": "zero-shot-classification", "batch_size": 4})
    names = ("image_retrieval_recall", "text_retrieval_recall", "mean_recall")
    for evaluator, keys in [
        (retrieval, {f"{m}@{k}" for k in (1, 5) for m in names}),
        (zero_shot, {"acc1", "acc5", "mean_per_class_recall"}),
    ]:
        assert isinstance(evaluator, clipforge.Evaluator)
        metrics = evaluator.evaluate(bundle, data, "cpu")
        assert set(metrics) == keys
        assert all(type(v) is float and math.isfinite(v) and 0.0 <= v <= 1.0 for v in metrics.values()), metrics


# -- bad input ------------------------------------------------------------------------------


def small_bundle():
    return table_bundle([onehot(0, 2), onehot(1, 2)], {"a x": onehot(0, 2), "a y": onehot(1, 2), "x": onehot(0, 2)})


@pytest.mark.parametrize(
    "dataset, message",
    [
        ([Sample("s0", picture(0), "x", label=0)], "has no `classes`"),
        (Labelled([Sample("s0", picture(0), "x")], ["x", "y"]), "sample 's0' has label None"),
        (Labelled([Sample("s0", picture(0), "x", label=2)], ["x", "y"]), "outside the 2 classes"),
        (Labelled([], ["x", "y"]), "the dataset is empty"),
        (Labelled([Sample("s0", picture(0), "x", label=0)], ["x", "y", "x"]), "duplicate names: x"),
        (Labelled([Sample("s0", picture(0), "x", label=0)], []), "`classes` is empty"),
        (Labelled([Sample("s0", picture(0), "x", label=0)], ["x", "y"], templates=["a photo"]), "dataset's templates"),
        (Labelled([Sample("s0", b"not a png", "x", label=0)], ["x", "y"]), "cannot decode its image"),
    ],
)
def test_zero_shot_refuses_bad_datasets(dataset, message):
    with pytest.raises(clipforge.ConfigError, match="zero-shot-classification|sample 's0'") as e:
        ZeroShotClassification().evaluate(small_bundle(), dataset, "cpu")
    assert message in str(e.value)


@pytest.mark.parametrize(
    "dataset, message",
    [
        ([], "retrieval: the dataset is empty"),
        ([Sample("s0", picture(0), [])], "retrieval: sample 's0' has an empty or non-text caption"),
        ([Sample("s0", picture(0), ["x", ""])], "retrieval: sample 's0' has an empty or non-text caption"),
    ],
)
def test_retrieval_refuses_bad_datasets(dataset, message):
    with pytest.raises(clipforge.ConfigError) as e:
        Retrieval().evaluate(small_bundle(), dataset, "cpu")
    assert message in str(e.value)


@pytest.mark.parametrize(
    "entry, field",
    [
        ({"type": "zero-shot-classification", "templates": ["a photo"]}, "templates.0"),
        ({"type": "zero-shot-classification", "templates": ["{c}", "{c} and {d}"]}, "templates.1"),
        ({"type": "zero-shot-classification", "templates": ["{c"]}, "templates.0"),
        ({"type": "zero-shot-classification", "templates": []}, "templates"),
        ({"type": "zero-shot-classification", "batch_size": 0}, "batch_size"),
        ({"type": "retrieval", "ks": [1, 0]}, "ks.1"),
        ({"type": "retrieval", "ks": []}, "ks"),
        ({"type": "retrieval", "batch_size": -1}, "batch_size"),
        ({"type": "retrieval", "k": [1]}, "k"),
    ],
)
def test_recipe_validation_names_the_evaluator_and_the_field(catalog, entry, field):
    with pytest.raises(clipforge.RecipeError) as e:
        catalog.create("evaluators", entry)
    assert f"'{entry['type']}'" in str(e.value)
    assert field in [path for path, _ in e.value.errors]


# -- embedding geometry at scale --------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 200), dim=st.integers(1, 16), block=st.integers(1, 256), seed=st.integers(0, 2**16))
def test_uniformity_in_blocks_is_the_pairwise_one(n, dim, block, seed):
    """Whatever the block size: exactly log mean exp(-2 d^2) over torch.pdist's pairs, in float64."""
    from clipforge.plugins.evaluators.geometry import uniformity

    x = F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=1)
    reference = torch.pdist(x.double()).pow(2).mul(-2).exp().mean().log().item()
    assert uniformity(x, block=block) == pytest.approx(reference, abs=1e-9)


@pytest.mark.parametrize("n, sample", [(50, 10), (500, 64), (3, 2)])
def test_uniformity_is_taken_on_a_seeded_sample_of_rows(n, sample):
    from clipforge.plugins.evaluators.geometry import geometry, uniformity

    g = torch.Generator().manual_seed(n)
    images, texts = F.normalize(torch.randn(n, 8, generator=g), dim=1), F.normalize(torch.randn(n, 8, generator=g), dim=1)
    got = geometry(images, texts, sample=sample, seed=3)
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(3))[:sample]
    assert got["uniformity_image"] == pytest.approx(uniformity(images[rows]), abs=1e-12)
    assert got["uniformity_text"] == pytest.approx(uniformity(texts[rows]), abs=1e-12)
    assert geometry(images, texts, sample=sample, seed=3) == got  # the same rows for the same seed
    assert geometry(images, texts, sample=n, seed=3)["uniformity_image"] == pytest.approx(uniformity(images), abs=1e-12)
    # alignment and the gap are over every pair, whatever the sample
    assert got["alignment"] == pytest.approx((images - texts).double().norm(dim=1).pow(2).mean().item())
