"""``data.eval_suite``: one named set per CLIP_benchmark task folder, the evaluator its type needs,
DataComp's aggregates over the tasks found, missing tasks listed and never averaged in."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import clipforge
from clipforge.core.plugins import PluginManager
from clipforge.core.recipe import EvalSuiteConfig
from clipforge.core.suites import Suite, Task, find_suite, main_metric
from clipforge.core.validation import load_recipe
from clipforge.engine.evaluation import evaluate
from tests.clip_benchmark_folders import export_tiny_model, write_task
from tests.conftest import TINY_RECIPE


@pytest.fixture(scope="module")
def suite_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    write_task(root / "tasks" / "imagenet1k", "classification", 40, seed=1)
    write_task(root / "tasks" / "wds_vtab-pets", "classification", 30, seed=2)
    write_task(root / "tasks" / "flickr30k", "retrieval", 30, seed=3)
    (root / "tasks" / "notes").mkdir()  # a folder that is no task
    return root


def suite_recipe(root, **suite):
    data = copy.deepcopy(TINY_RECIPE)
    data["data"] = {"train": data["data"]["train"], "eval_suite": {"root": str(root / "tasks"), **suite}}
    data["evaluation"] = []
    data["registry"] = {
        "promote": {
            "metric": "suite/average",
            "guards": [{"metric": "imagenet1k/zero-shot-classification/acc1", "max_drop": 0.005}],
        }
    }
    return data


def test_a_suite_evaluates_every_task_with_its_evaluator_and_aggregates(suite_root):
    model = export_tiny_model(suite_root / "model")
    recipe = load_recipe(suite_recipe(suite_root, tasks="all", ks=[1, 5]))
    m = evaluate(recipe, PluginManager(load_entry_points=False).catalog, str(model), device="cpu").metrics
    assert {"eval/imagenet1k/zero-shot-classification/acc1", "eval/wds_vtab-pets/zero-shot-classification/mean_per_class_recall",
            "eval/flickr30k/retrieval/mean_recall@1"} <= set(m)  # fmt: skip
    assert not any(k.startswith(("eval/flickr30k/zero-shot", "eval/imagenet1k/retrieval")) for k in m)
    main = [
        m["eval/imagenet1k/zero-shot-classification/acc1"],
        m["eval/wds_vtab-pets/zero-shot-classification/mean_per_class_recall"],
        m["eval/flickr30k/retrieval/mean_recall@1"],
    ]
    assert m["eval/suite/average"] == pytest.approx(sum(main) / 3)
    assert m["eval/suite/imagenet"] == pytest.approx(main[0])
    assert m["eval/suite/vtab"] == pytest.approx(main[1])
    assert m["eval/suite/retrieval"] == pytest.approx(main[2])
    assert "eval/suite/imagenet_shifts" not in m  # no task of that group: no mean of nothing
    assert m["eval/suite/tasks"] == 3 and m["eval/suite/missing"] == 0


def test_tasks_asked_for_but_missing_are_listed_not_averaged(suite_root, caplog):
    suite = find_suite(EvalSuiteConfig(root=str(suite_root / "tasks"), tasks=["imagenet1k", "imagenetv2", "cars"]))
    assert [t.name for t in suite.tasks] == ["imagenet1k"]
    assert suite.missing == ["imagenetv2", "cars"]
    aggregates = suite.aggregates({"eval/imagenet1k/zero-shot-classification/acc1": 0.5}, "eval/")
    assert aggregates["suite/missing"] == 2 and aggregates["suite/average"] == 0.5


def test_a_root_with_no_task_is_refused(tmp_path):
    (tmp_path / "empty" / "junk").mkdir(parents=True)
    with pytest.raises(clipforge.ConfigError, match=r"no task under .*empty.*test/nshards.txt"):
        find_suite(EvalSuiteConfig(root=str(tmp_path / "empty")))


def test_guards_name_task_metrics_or_aggregates(suite_root):
    load_recipe(suite_recipe(suite_root, tasks=["imagenet1k", "flickr30k"]))
    bad = suite_recipe(suite_root, tasks=["flickr30k"])
    bad["registry"]["promote"]["metric"] = "suite/best"
    with pytest.raises(clipforge.RecipeError) as e:
        load_recipe(bad)
    assert "registry.promote.metric" in str(e.value) and "suite/{average," in str(e.value)
    assert "registry.promote.guards.0.metric" in str(e.value) and "'imagenet1k' is not one of data.eval_suite.tasks" in str(
        e.value
    )
    with pytest.raises(clipforge.RecipeError, match="'suite' names the suite's aggregates"):
        load_recipe(suite_recipe(suite_root, tasks=["suite"]))


_TASKS = [
    "imagenet1k",
    "imagenetv2",
    "imagenet-r",
    "vtab-cifar10",
    "wds_vtab-flowers",
    "fgvc_aircraft",
    "mscoco_captions",
    "cars",
]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(_TASKS), min_size=1, unique=True), st.lists(st.floats(0, 1), min_size=8, max_size=8))
def test_the_average_is_the_mean_of_each_tasks_main_metric_and_groups_partition_them(names, scores):
    kinds = {t: "retrieval" if t == "mscoco_captions" else "classification" for t in names}
    suite = Suite(EvalSuiteConfig(root="x"), [Task(t, f"x/{t}", kinds[t]) for t in names])
    metrics = {f"eval/{t}/{main_metric(t, kinds[t])}": s for t, s in zip(names, scores, strict=False)}
    metrics |= {f"eval/{t}/zero-shot-classification/acc5": 2.0 for t in names}  # not a main metric: never averaged
    agg = suite.aggregates(metrics, "eval/")
    assert agg["suite/average"] == pytest.approx(sum(scores[: len(names)]) / len(names))
    groups = {"imagenet": ["imagenet1k"], "imagenet_shifts": ["imagenetv2", "imagenet-r"],
              "vtab": ["vtab-cifar10", "wds_vtab-flowers"], "retrieval": ["mscoco_captions"]}  # fmt: skip
    for group, members in groups.items():
        present = [scores[names.index(t)] for t in members if t in names]
        assert (f"suite/{group}" in agg) == bool(present)
        if present:
            assert agg[f"suite/{group}"] == pytest.approx(sum(present) / len(present))
    assert main_metric("wds_vtab-flowers", "classification").endswith("mean_per_class_recall")
    assert main_metric("fgvc_aircraft", "classification").endswith("mean_per_class_recall")
