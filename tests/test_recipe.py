"""Recipes: YAML loading, overrides, validation with full field paths, the embedded default."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from clipforge.core.errors import ConfigError, RecipeError
from clipforge.core.overrides import apply_overrides
from clipforge.core.recipe import Recipe
from clipforge.core.recipe_yaml import builtin_recipe, read_yaml
from clipforge.core.validation import load_recipe
from tests.conftest import write_yaml


def test_the_embedded_default_is_valid():
    recipe = load_recipe(builtin_recipe("shapes"))
    assert recipe.name == "shapes" and recipe.model_name == "shapes-clip"
    assert [ev.type for ev in recipe.evaluation] == [
        "zero-shot-classification",
        "retrieval",
        "embedding-geometry",
        "compositionality",
        "linear-probe",
        "digits",
    ]


def test_defaults_and_model_name(tiny_recipe):
    del tiny_recipe["registry"]
    recipe = load_recipe(tiny_recipe)
    assert recipe.model_name == "tiny" and recipe.registry.promote is None
    assert recipe.train.precision == "auto" and recipe.loss.type == "clip"


def test_overrides_parse_values_as_yaml(tmp_path, tiny_recipe):
    path = write_yaml(tmp_path / "r.yaml", tiny_recipe)
    recipe = load_recipe(path, ["train.epochs=3", "train.grad_clip=1.5", "evaluation.1.ks=[1, 2]", "model.config.embed_dim=16"])
    assert recipe.train.epochs == 3 and recipe.train.grad_clip == 1.5
    assert recipe.evaluation[1].fields["ks"] == [1, 2]
    assert recipe.model.fields["config"]["embed_dim"] == 16


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epoch=1", "'train.epoch' is not a field of the recipe"),
        ("nope.x=1", "'nope' is not in the recipe"),
        ("evaluation.7.ks=[1]", "'evaluation.7' is not in the recipe"),
        ("train.epochs", "expected KEY=VALUE"),
    ],
)
def test_bad_overrides_are_refused(tiny_recipe, override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_recipe(tiny_recipe, [override])


def test_every_error_is_reported_with_its_path(tiny_recipe):
    tiny_recipe["train"]["epochs"] = 0
    tiny_recipe["train"]["colour"] = "red"
    tiny_recipe["data"]["train"]["size"] = "many"
    tiny_recipe["curation"][0]["min_wordz"] = 2
    tiny_recipe["model"]["config"]["vision_cfg"]["width"] = -1
    tiny_recipe["loss"] = {"type": "nope"}
    del tiny_recipe["name"]
    with pytest.raises(RecipeError) as e:
        load_recipe(tiny_recipe)
    paths = dict(e.value.errors)
    assert paths["train.epochs"] == "Input should be greater than 0"
    assert paths["train.colour"] == "Extra inputs are not permitted"
    assert paths["name"] == "Field required"
    assert "valid integer" in paths["data.train.size"]
    assert "unknown parameter" in paths["curation.0.min_wordz"]
    assert paths["model.config.vision_cfg.width"] == "Input should be greater than 0"
    assert "unknown loss 'nope'; available: clip" in paths["loss.type"]


def test_promotion_metric_must_come_from_an_evaluator(tiny_recipe):
    tiny_recipe["registry"]["promote"]["metric"] = "linear-probe/acc1"
    with pytest.raises(RecipeError, match="registry.promote.metric"):
        load_recipe(tiny_recipe)


def test_missing_file_bad_yaml_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(tmp_path / "nothere.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_recipe(tmp_path / "list.yaml")


def test_digest_is_stable_and_sensitive(tiny_recipe):
    a, b = load_recipe(tiny_recipe), load_recipe(tiny_recipe)
    assert a.digest() == b.digest()
    assert load_recipe(tiny_recipe, ["train.seed=1"]).digest() != a.digest()
    assert load_recipe(tiny_recipe, ["train.seed=1"]).digest("data", "curation") == a.digest("data", "curation")


def test_yaml_round_trip_and_json_schema(tiny_recipe):
    recipe = load_recipe(tiny_recipe)
    assert load_recipe(yaml.safe_load(recipe.to_yaml())).digest() == recipe.digest()
    schema = Recipe.model_json_schema()
    assert {"name", "data", "model"} <= set(schema["required"])


def named_sets(recipe: dict) -> dict:
    recipe["data"]["eval"] = {
        "shapes": {"type": "synthetic-shapes", "size": 20, "seed": 1},
        "digits": {"type": "digits", "size": 20},
    }
    recipe["registry"]["promote"] = {
        "metric": "shapes/retrieval/mean_recall@1",
        "guards": [{"metric": "eval/digits/zero-shot-classification/acc1", "max_drop": 0.02}],
    }
    return recipe


def test_named_evaluation_sets_and_guards_are_accepted(tiny_recipe):
    r = load_recipe(named_sets(tiny_recipe))
    assert list(r.data.eval_sets()) == ["shapes", "digits"]
    assert r.registry.promote.guards[0].max_drop == 0.02
    assert load_recipe(r.as_dict()).digest() == r.digest()  # the mapping form round-trips
    tiny_recipe["data"]["eval"] = {"type": "synthetic-shapes", "size": 5}
    tiny_recipe["registry"]["promote"] = {"metric": "retrieval/mean_recall@1"}
    single = load_recipe(tiny_recipe)
    assert list(single.data.eval_sets()) == [None]


@pytest.mark.parametrize(
    "change, path, message",
    [
        (lambda r: r["registry"]["promote"].update(metric="retrieval/mean_recall@1"), "registry.promote.metric", "'<set>/<evaluator>/<metric>'"),
        (lambda r: r["registry"]["promote"].update(metric="nope/retrieval/mean_recall@1"), "registry.promote.metric", "sets (shapes, digits)"),
        (lambda r: r["registry"]["promote"]["guards"][0].update(metric="digits/linear-probe/acc1"), "registry.promote.guards.0.metric", "evaluators (zero-shot-classification, retrieval)"),
        (lambda r: r["registry"]["promote"]["guards"][0].update(max_drop=-0.1), "registry.promote.guards.0.max_drop", "greater than or equal to 0"),
        (lambda r: r["evaluation"][0].update(sets=["shapes", "clocks"]), "evaluation.0.sets", "no evaluation set 'clocks'; data.eval names: shapes, digits"),
        (lambda r: r["data"]["eval"].update({"bad name": {"type": "digits"}}), "data.eval.bad name.[key]", "pattern"),
        (lambda r: r["data"]["eval"]["digits"].update(colour=1), "data.eval.digits.colour", "unknown parameter"),
    ],
)  # fmt: skip
def test_bad_sets_and_guards_name_the_field(tiny_recipe, change, path, message):
    recipe = named_sets(tiny_recipe)
    change(recipe)
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe)
    errors = dict(e.value.errors)
    assert path in errors, errors
    assert message in errors[path]


def test_the_continual_recipe_s_steps_each_learn_one_domain_and_guard_the_earlier_ones():
    """recipes/continual-shapes.yaml's header gives one command per domain: each is a valid recipe that
    trains on the domain of its evaluation set, is promoted on it, guards every earlier domain, and
    warm-starts from the champion with replay on a fixed budget, but for the first."""
    path = Path(__file__).parents[1] / "recipes" / "continual-shapes.yaml"
    steps = [line.split(": ", 1) for line in path.read_text().splitlines() if line.startswith("#   ") and "clipforge run" in line]
    assert [name.strip("# ") for name, _ in steps] == ["A", "B", "C"]
    domain_fields = {"type", "colors", "shapes", "fill", "background", "rotation", "scale"}
    budgets = []
    for i, (name, command) in enumerate(steps):
        args = shlex.split(command)
        assert args[:3] == ["clipforge", "run", "recipes/continual-shapes.yaml"]
        overrides = [args[j + 1] for j, a in enumerate(args) if a == "--set"]
        recipe = load_recipe(apply_overrides(read_yaml(path), overrides))
        domain = name.strip("# ")
        sets = recipe.data.eval_sets()
        assert list(sets) == ["A", "B", "C"]
        trained = {k: v for k, v in recipe.data.train.entry().items() if k in domain_fields}
        assert trained == {k: v for k, v in sets[domain].entry().items() if k in domain_fields}
        assert recipe.registry.promote is not None
        assert recipe.registry.promote.metric == f"{domain}/zero-shot-classification/acc1"
        assert [g.metric.split("/")[0] for g in recipe.registry.promote.guards] == ["A", "B", "C"][:i]
        assert (recipe.train.init_from is not None) == (i > 0) and recipe.data.replay is not None
        # a warm start costs a fixed budget whatever the data; the first step trains from scratch for its epochs
        assert (recipe.train.budget is not None) == (i > 0) == (recipe.train.epochs is None)
        budgets.append(recipe.train.budget)
    assert budgets[1] == budgets[2] is not None


def test_component_defaults_come_from_the_models():
    from clipforge.core.recipe import COMPONENT_FIELDS, component_entries, default_entry

    assert default_entry("loss") == {"type": "clip"}
    assert default_entry("train.launcher") == {"type": "local"}
    assert default_entry("model") is None and default_entry("data.eval") is None and default_entry("train.epochs") is None
    assert {"model", "loss", "train.launcher", "curation.*"} <= set(COMPONENT_FIELDS)
    # the default loss is checked with the rest, after what the recipe lists
    entries = component_entries({"model": {"type": "m"}, "curation": [{"type": "c"}]})
    assert [(kind, path) for kind, path, _ in entries] == [
        ("encoders", "model"),
        ("curation_steps", "curation.0"),
        ("losses", "loss"),
    ]
