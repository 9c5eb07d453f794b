"""The evaluators beyond zero-shot and retrieval, the shared embeddings, the figures, the
champion-vs-challenger report and `clipforge evaluate`: exact values on models whose embeddings
the tests choose, and every bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clipforge
from clipforge import Sample
from clipforge.core import embeddings
from clipforge.core.plugins import PluginManager
from clipforge.core.validation import load_recipe
from clipforge.engine.evaluation import evaluate_bundle
from clipforge.plugins.evaluators.compositionality import Compositionality
from clipforge.plugins.evaluators.digits import DigitsZeroShot
from clipforge.plugins.evaluators.geometry import EmbeddingGeometry
from clipforge.plugins.evaluators.linear_probe import LinearProbe, fit_logistic
from clipforge.plugins.evaluators.retrieval import Retrieval
from clipforge.registry.report import build_report, compare, render_markdown
from tests.conftest import TINY_RECIPE
from tests.test_evaluators import Labelled, onehot, pairs, picture, table_bundle, unit


@pytest.fixture(scope="module")
def catalog():
    return PluginManager(load_entry_points=False).catalog


# -- embedding-geometry -----------------------------------------------------------------------


def test_geometry_exact_values():
    # images e0, e1; captions: e0 itself, and e1 turned 90 degrees towards e2
    images = [onehot(0, 3), onehot(1, 3)]
    texts = {"t0": onehot(0, 3), "t1": onehot(2, 3)}
    bundle = table_bundle(images, texts)
    metrics = EmbeddingGeometry().evaluate(bundle, pairs(list(texts)), "cpu")
    # alignment: (0 + |e1 - e2|^2) / 2 = 1
    assert metrics["alignment"] == pytest.approx(1.0)
    # one pair per modality at squared distance 2: log exp(-4) = -4
    assert metrics["uniformity_image"] == pytest.approx(-4.0)
    assert metrics["uniformity_text"] == pytest.approx(-4.0)
    # centroids (.5, .5, 0) and (.5, 0, .5): distance sqrt(.5)
    assert metrics["modality_gap"] == pytest.approx(math.sqrt(0.5))
    assert metrics["logit_scale"] == pytest.approx(100.0)


def test_geometry_collapsed_embeddings_have_uniformity_zero_and_no_gap():
    bundle = table_bundle([unit(1, 1)] * 3, {"a": unit(1, 1), "b": unit(1, 1), "c": unit(1, 1)})
    metrics = EmbeddingGeometry().evaluate(bundle, pairs(["a", "b", "c"]), "cpu")
    assert metrics["alignment"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["uniformity_image"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["modality_gap"] == pytest.approx(0.0, abs=1e-12)


# -- compositionality -------------------------------------------------------------------------


def two_shapes(i, c1, s1, c2, s2, rel="above"):
    meta = {"shapes": [{"color": c1, "shape": s1}, {"color": c2, "shape": s2}], "relation": rel}
    return Sample(f"s{i}", picture(i), "x", meta=meta)


def test_compositionality_counts_strict_wins_and_skips_one_shape_images():
    right, wrong = unit(1, 0), unit(0, 1)
    texts = {
        # image 0 binds colours: true caption closer; image 1 does not: the swap is closer
        "a red circle and a blue square": right, "a blue circle and a red square": wrong,
        "a green star and an orange cross": wrong, "an orange star and a green cross": right,
        # relations: image 0 ties (no strict win), image 1 wins
        "a red circle above a blue square": right, "a red circle below a blue square": right,
        "a green star to the left of an orange cross": right, "a green star to the right of an orange cross": wrong,
    }  # fmt: skip
    data = [
        two_shapes(0, "red", "circle", "blue", "square"),
        Sample("s1", picture(1), "one shape", meta={"shapes": [{"color": "red", "shape": "star"}], "relation": None}),
        two_shapes(2, "green", "star", "orange", "cross", "to the left of"),
    ]
    bundle = table_bundle([unit(1, 0)] * 3, texts)
    assert Compositionality().evaluate(bundle, data, "cpu") == {"attribute_swap_accuracy": 0.5, "relation_swap_accuracy": 0.5}


def test_compositionality_on_synthetic_shapes_builds_the_swaps_from_meta(catalog):
    dataset = catalog.create("datasets", {"type": "synthetic-shapes", "size": 12, "seed": 3, "image_size": 16})
    seen: list[str] = []

    def tokenizer(texts):
        seen.extend(texts)
        return torch.zeros(len(texts), dtype=torch.long)

    bundle = table_bundle([[1.0, 0.0]] * 256, {"x": [1.0, 0.0]})
    bundle.tokenizer = tokenizer
    metrics = Compositionality().evaluate(bundle, dataset, "cpu")
    assert metrics == {"attribute_swap_accuracy": 0.0, "relation_swap_accuracy": 0.0}  # all tie: no strict win
    two = [s.meta for s in dataset if s.meta["relation"]]
    a, b = two[0]["shapes"]
    assert seen[0].endswith(
        f"{a['color']} {a['shape']} and " + ("an" if b["color"][0] in "aeiou" else "a") + f" {b['color']} {b['shape']}"
    )
    assert f"{b['color']} {a['shape']} and" in seen[len(two)]
    assert len(seen) == 4 * len(two)


def test_compositionality_refuses_data_without_two_shapes():
    with pytest.raises(clipforge.ConfigError, match="compositionality: no sample has two shapes"):
        Compositionality().evaluate(table_bundle([onehot(0, 2)], {}), [Sample("s0", picture(0), "x")], "cpu")
    with pytest.raises(clipforge.ConfigError, match="compositionality: the dataset is empty"):
        Compositionality().evaluate(table_bundle([onehot(0, 2)], {}), [], "cpu")


# -- linear-probe -----------------------------------------------------------------------------


def blobs(n_per_class=30, n_classes=3, dim=4, spread=0.6, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(n_classes, dim)
    x = torch.cat([centres[c] + spread * torch.randn(n_per_class, dim, generator=g) for c in range(n_classes)])
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    return F.normalize(x, dim=1), y


def test_fit_logistic_matches_sklearn_logistic_regression():
    sklearn = pytest.importorskip("sklearn.linear_model")
    x, y = blobs()
    for wd in (1e-3, 1e-1):
        w, b = fit_logistic(x, y, 3, wd, max_iter=500)
        ref = sklearn.LogisticRegression(C=1 / (len(y) * wd), tol=1e-10, max_iter=10_000).fit(x.numpy(), y.numpy())
        np.testing.assert_allclose(w.numpy(), ref.coef_, atol=2e-3)
        # sklearn's intercepts sum to zero; ours only up to a constant
        np.testing.assert_allclose((b - b.mean()).numpy(), ref.intercept_ - ref.intercept_.mean(), atol=2e-3)
        assert ((x @ w.T + b).argmax(1).numpy() == ref.predict(x.numpy())).all()


def probe_dataset(x, y, classes):
    images = x.tolist()
    return table_bundle(images, {}), Labelled([Sample(f"s{i}", picture(i), "x", label=int(c)) for i, c in enumerate(y)], classes)


def test_linear_probe_separable_data_scores_perfectly_and_picks_the_largest_tied_penalty():
    x, y = blobs(n_per_class=20, spread=0.05)
    bundle, data = probe_dataset(x, y, ["a", "b", "c"])
    metrics = LinearProbe(weight_decays=[1e-4, 1e-3]).evaluate(bundle, data, "cpu")
    assert metrics == {"acc1": 1.0, "mean_per_class_recall": 1.0, "weight_decay": 1e-3}


def test_linear_probe_acc5_with_five_classes_and_chance_level_on_noise():
    g = torch.Generator().manual_seed(1)
    x = F.normalize(torch.randn(200, 8, generator=g), dim=1)
    y = torch.randint(0, 5, (200,), generator=g)
    bundle, data = probe_dataset(x, y, list("abcde"))
    metrics = LinearProbe(seed=2).evaluate(bundle, data, "cpu")
    assert metrics["acc5"] == 1.0 and set(metrics) == {"acc1", "acc5", "mean_per_class_recall", "weight_decay"}
    assert metrics["acc1"] < 0.45  # labels are noise: near 0.2


@pytest.mark.parametrize(
    "dataset, message",
    [
        ([Sample("s0", picture(0), "x")], "linear-probe: the dataset has no `classes`"),
        (Labelled([Sample("s0", picture(0), "x")], ["a", "b"]), "linear-probe: sample 's0' has label None"),
        (Labelled([], ["a", "b"]), "linear-probe: the dataset is empty"),
        (
            Labelled([Sample("s0", picture(0), "x", label=0)], ["a", "a"]),
            "linear-probe: the dataset's `classes` has duplicate names: a",
        ),
        (Labelled([Sample("s0", picture(0), "x", label=0)], ["a", "b"]), "linear-probe: too few samples"),
    ],
)
def test_linear_probe_refuses_bad_datasets(dataset, message):
    with pytest.raises(clipforge.ConfigError) as e:
        LinearProbe().evaluate(table_bundle([onehot(0, 2)], {}), dataset, "cpu")
    assert message in str(e.value)


# -- digits -----------------------------------------------------------------------------------


def test_digits_dataset_is_scikit_learns(catalog):
    digits = catalog.create("datasets", {"type": "digits"})
    assert len(digits) == 1797 and digits.classes[7] == "seven"
    s = digits[0]
    assert (s.label, s.caption, s.image.size) == (0, "a photo of the digit zero", (32, 32))
    subset = catalog.create("datasets", {"type": "digits", "size": 50, "seed": 4, "image_size": 16})
    assert len(subset) == 50 and subset[0].image.size == (16, 16)
    assert [x.key for x in subset] == [x.key for x in catalog.create("datasets", {"type": "digits", "size": 50, "seed": 4})]


def test_digits_evaluator_ignores_the_recipe_dataset_and_prompts_with_digit_names():
    prompts: list[str] = []
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    # every image embeds as "seven": acc1 is the share of sevens in the subset
    texts = {f"a photo of the digit {c}.": onehot(i, 10) for i, c in enumerate(names)}
    bundle = table_bundle([onehot(7, 10)] * 256, texts)
    vocab = list(texts)
    bundle.tokenizer = lambda ts: (prompts.extend(ts), torch.tensor([vocab.index(t) for t in ts]))[1]
    evaluator = DigitsZeroShot(templates=["a photo of the digit {c}."], size=100, seed=0)
    metrics = evaluator.evaluate(bundle, [Sample("ignored", b"garbage", "x")], "cpu")
    from clipforge.plugins.datasets.digits import Digits

    sevens = sum(s.label == 7 for s in Digits(size=100, seed=0)) / 100
    assert metrics["acc1"] == pytest.approx(sevens) and metrics["mean_per_class_recall"] == pytest.approx(0.1)
    assert prompts == list(texts)


# -- bad entries, by field --------------------------------------------------------------------


@pytest.mark.parametrize(
    "entry, field",
    [
        ({"type": "digits", "templates": ["the digit"]}, "templates.0"),
        ({"type": "digits", "size": 0}, "size"),
        ({"type": "linear-probe", "weight_decays": []}, "weight_decays"),
        ({"type": "linear-probe", "test_fraction": 1.0}, "test_fraction"),
        ({"type": "linear-probe", "train_dataset": {"size": 3}}, "train_dataset"),
        ({"type": "embedding-geometry", "batch_size": 0}, "batch_size"),
        ({"type": "compositionality", "swaps": 1}, "swaps"),
    ],
)
def test_new_evaluators_name_the_bad_field(catalog, entry, field):
    with pytest.raises(clipforge.RecipeError) as e:
        catalog.create("evaluators", entry)
    assert f"'{entry['type']}'" in str(e.value)
    assert field in [path for path, _ in e.value.errors]


# -- shared embeddings ------------------------------------------------------------------------


def test_a_dataset_is_embedded_once_for_every_evaluator_that_uses_it(monkeypatch):
    calls = []
    real = embeddings._embed_images
    monkeypatch.setattr(embeddings, "_embed_images", lambda *a, **k: calls.append(1) or real(*a, **k))
    texts = {f"t{i}": onehot(i, 4) for i in range(4)}
    bundle, data = table_bundle([onehot(i, 4) for i in range(4)], texts), pairs(list(texts))
    with embeddings.shared_embeddings() as cache:
        first = Retrieval().evaluate(bundle, data, "cpu")
        EmbeddingGeometry().evaluate(bundle, data, "cpu")
        assert Retrieval().evaluate(bundle, data, "cpu") == first
        assert len(calls) == 1 and len(cache.texts) == 1  # geometry's first captions are retrieval's captions
        Retrieval().evaluate(bundle, list(data), "cpu")  # another dataset object: embedded again
        assert len(calls) == 2
    Retrieval().evaluate(bundle, data, "cpu")  # outside: nothing is cached
    assert len(calls) == 3


def test_a_cached_dataset_is_still_checked_for_each_evaluator():
    bundle = table_bundle([onehot(0, 2)], {"x": onehot(0, 2)})
    data = Labelled([Sample("s0", picture(0), "x")], ["a", "b"])
    with embeddings.shared_embeddings():
        Retrieval().evaluate(bundle, data, "cpu")
        with pytest.raises(clipforge.ConfigError, match="linear-probe: sample 's0' has label None"):
            LinearProbe().evaluate(bundle, data, "cpu")


def test_evaluate_bundle_runs_every_new_evaluator_and_keeps_figure_data(catalog, monkeypatch):
    calls = []
    real = embeddings._embed_images
    monkeypatch.setattr(embeddings, "_embed_images", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    data = dict(TINY_RECIPE, evaluation=[
        {"type": "zero-shot-classification"}, {"type": "retrieval", "ks": [1, 5]}, {"type": "embedding-geometry"},
        {"type": "compositionality"}, {"type": "linear-probe", "weight_decays": [1e-3]},
        {"type": "digits", "size": 30},
    ])  # fmt: skip
    recipe = load_recipe(data, catalog=catalog)
    torch.manual_seed(0)
    bundle = catalog.create("encoders", TINY_RECIPE["model"])
    announced: list[tuple[int, int, str, str]] = []
    result = evaluate_bundle(recipe, catalog, bundle, "cpu", on_evaluator=lambda *a: announced.append(a))
    assert announced == [(i + 1, 6, e.label, "data.eval") for i, e in enumerate(recipe.evaluation)]
    # the penalty the linear probe chose is a setting, not a score to compare models by
    assert result.params == {"eval/linear-probe/weight_decay": 1e-3}
    assert not any(k.endswith("weight_decay") for k in result.metrics)
    # data.eval once for five evaluators, the digits once
    assert len(calls) == 2
    labels = {k.split("/")[1] for k in result.metrics}
    assert labels == {"zero-shot-classification", "retrieval", "embedding-geometry", "compositionality", "linear-probe", "digits"}
    assert all(math.isfinite(v) for v in result.metrics.values())
    assert set(result.details) == {"zero-shot-classification", "retrieval", "digits"}
    assert np.array(result.details["zero-shot-classification"]["confusion"]).sum() == 60
    assert len(result.details["retrieval"]["recall_curve"]["k"]) == 5

    from clipforge.flows.figures import evaluation_figures

    figures = evaluation_figures(result.details)
    assert set(figures) == {
        "evaluation/zero-shot-classification/confusion.png", "evaluation/retrieval/similarity.png",
        "evaluation/retrieval/recall_at_k.png", "evaluation/digits/confusion.png",
    }  # fmt: skip


# -- the champion-vs-challenger report --------------------------------------------------------


def test_report_rows_deltas_and_winners_by_each_metrics_direction():
    challenger = {
        "eval/retrieval/mean_recall@1": 0.6, "eval/embedding-geometry/alignment": 0.5,
        "eval/embedding-geometry/modality_gap": 0.3, "eval/zero-shot-classification/acc1": 0.4,
    }  # fmt: skip
    champion = {
        "eval/retrieval/mean_recall_at_1": 0.5, "eval/embedding-geometry/alignment": 0.4,
        "eval/embedding-geometry/modality_gap": 0.2, "eval/zero-shot-classification/acc1": 0.4, "eval/old/metric": 1.0,
    }  # fmt: skip
    rows = {r["metric"]: r for r in compare(challenger, champion, promote_metric="retrieval/mean_recall@1")}
    assert rows["eval/retrieval/mean_recall@1"]["delta"] == pytest.approx(0.1)
    assert rows["eval/retrieval/mean_recall@1"]["winner"] == "challenger"
    assert rows["eval/retrieval/mean_recall@1"]["promotion_metric"]
    assert (rows["eval/embedding-geometry/alignment"]["better"], rows["eval/embedding-geometry/alignment"]["winner"]) == (
        "min",
        "champion",
    )
    assert rows["eval/embedding-geometry/modality_gap"]["winner"] == "n/a"
    assert rows["eval/zero-shot-classification/acc1"]["winner"] == "tie"
    assert rows["eval/old/metric"]["challenger"] is None
    # with mode min the rule's metric ranks the other way
    (row,) = [
        r
        for r in compare(challenger, champion, promote_metric="eval/retrieval/mean_recall@1", promote_mode="min")
        if r["promotion_metric"]
    ]
    assert row["winner"] == "champion"

    report = build_report(
        model_name="m", challenger_version="3", challenger=challenger, champion_version="2", champion=champion,
        rule={"metric": "eval/retrieval/mean_recall@1", "mode": "max", "min_delta": 0.0}, promoted=True, reason="it beats v2",
    )  # fmt: skip
    assert report["tally"] == {"challenger": 1, "champion": 1, "tie": 1, "n/a": 2}
    json.dumps(report)
    md = render_markdown(report)
    assert "# m: v3 against the champion (v2)" in md and "**promoted to champion**. it beats v2" in md
    assert "| **`eval/retrieval/mean_recall@1`** (rule) | 0.6000 | 0.5000 | +0.1000 | higher | challenger |" in md


def test_report_without_champion():
    report = build_report(
        model_name="m", challenger_version="1", challenger={"eval/r/acc1": 0.5}, champion_version=None, champion=None,
        rule=None, promoted=True, reason="first version",
    )  # fmt: skip
    assert report["rows"][0]["winner"] == "n/a" and "There is no champion yet" in render_markdown(report)


@pytest.mark.parametrize(
    "dataset, message",
    [
        ([], "embedding-geometry: the dataset has 0 samples; it needs at least 2"),
        ([Sample("s0", picture(0), "x")], "embedding-geometry: the dataset has 1 samples"),
        (
            [Sample("s0", picture(0), ""), Sample("s1", picture(1), "x")],
            "embedding-geometry: sample 's0' has an empty or non-text caption",
        ),
    ],
)
def test_geometry_refuses_bad_datasets(dataset, message):
    with pytest.raises(clipforge.ConfigError) as e:
        EmbeddingGeometry().evaluate(table_bundle([onehot(0, 2), onehot(1, 2)], {"x": onehot(0, 2)}), dataset, "cpu")
    assert message in str(e.value)


def test_linear_probe_train_dataset_must_share_the_classes(monkeypatch):
    from clipforge.plugins.evaluators import linear_probe

    x, y = blobs(n_per_class=5, spread=0.05)
    bundle, data = probe_dataset(x, y, ["a", "b", "c"])
    monkeypatch.setattr(linear_probe, "_create_dataset", lambda entry: Labelled(list(data), ["a", "b", "d"]))
    with pytest.raises(clipforge.ConfigError, match="linear-probe: train_dataset's classes differ"):
        LinearProbe(train_dataset={"type": "any"}).evaluate(bundle, data, "cpu")
    # with the same classes, the whole evaluation set is the test set: separable blobs score 1
    monkeypatch.setattr(linear_probe, "_create_dataset", lambda entry: Labelled(list(data), ["a", "b", "c"]))
    assert LinearProbe(train_dataset={"type": "any"}).evaluate(bundle, data, "cpu")["acc1"] == 1.0
